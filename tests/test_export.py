"""The paper's workflow end to end on tiny checkpoints (docs/checkpoints.md "Export"): import an HF LLaVA folder,
fine-tune with Skip-Vision for 3 steps, export a self-contained folder, move it, and generate from it with KV
removal; the export's language model loads with plain transformers."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from skipvision.cli import main
from skipvision.data.tokenizer import load_tokenizer
from skipvision.inference import GenerationConfig, Request, VLMGenerator
from skipvision.weights.strict import WeightsMismatchError

from .conftest import TINY_RECIPE
from .test_llava_import import clip_processor, photo, tiny_llava


@pytest.fixture(scope="module")
def llava_folder(tiny_shapes: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("llava")
    tokenizer = load_tokenizer(tiny_shapes / "tokenizer")
    tiny_llava(tokenizer).save_pretrained(folder)
    clip_processor().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_import_fit_export_move_and_generate(llava_folder: Path, tiny_shapes: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    overrides = [
        f"data.root={tiny_shapes}",
        f"data.tokenizer={llava_folder}",
        f"output_dir={run}",
        f"model.encoder={{name: hf_clip, path: {llava_folder}}}",
        f"model.projector={{name: mlp2x_gelu, weights: {llava_folder}}}",
        "model.backbone.config=null",
        f"model.backbone.path={llava_folder}",
        "model.skip.policy={name: attention_score, num_retained: 4}",
        "model.skip.num_skipped=4",
        "trainer.max_steps=3",
    ]
    assert main(["fit", "--recipe", str(TINY_RECIPE), *overrides]) == 0
    exported = tmp_path / "export"
    assert main(["export", "--checkpoint", str(run), "--out", str(exported), "--max-shard-size", "40KB"]) == 0
    assert len(list(exported.glob("model-*.safetensors"))) > 1 and (exported / "model.safetensors.index.json").is_file()
    assert (exported / "llm" / "config.json").is_file() and (exported / "preprocessor_config.json").is_file()
    assert "attention_score" in (exported / "README.md").read_text()
    moved = tmp_path / "elsewhere" / "model"
    moved.parent.mkdir()
    shutil.move(exported, moved)  # nothing in it points outside it
    moved_run = tmp_path / "moved-run"
    shutil.move(run, moved_run)  # a run folder moved elsewhere still loads

    image = tmp_path / "photo.png"
    photo(40, 32, 5).save(image)
    request = Request("What colour is the circle?", image)
    config = GenerationConfig(max_new_tokens=5)
    from_run = VLMGenerator.from_checkpoint(moved_run)
    from_export = VLMGenerator.from_checkpoint(moved)
    (a,) = from_run.generate([request], config)
    (b,) = from_export.generate([request], config)
    assert a.token_ids == b.token_ids and a.stats.kv_bytes_kept < a.stats.kv_bytes_prefill  # KV removal on
    for name, tensor in from_run.model.state_dict().items():
        assert torch.equal(from_export.model.state_dict()[name], tensor), name

    plain = AutoModelForCausalLM.from_pretrained(moved / "llm").eval()
    ids = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, from_export.model.backbone(input_ids=ids).logits)

    (moved / "model.safetensors.index.json").unlink()
    next(iter(sorted(moved.glob("model-*.safetensors")))).unlink()
    with pytest.raises(WeightsMismatchError, match=r"\(export\) does not fit VisionLanguageModel: \d+ missing"):
        VLMGenerator.from_checkpoint(moved)
    assert main(["export", "--checkpoint", str(moved_run), "--out", str(moved)]) == 2  # not an empty folder
