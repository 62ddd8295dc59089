"""The paper's workflow end to end on tiny checkpoints (docs/checkpoints.md "Export"): the shipped recipe
``llava15-import`` imports an HF LLaVA folder and fine-tunes it with Skip-Vision for 3 steps; the run is exported as a
self-contained folder, moved, and generates with KV removal; the export's language model loads with plain
transformers."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoModelForCausalLM, AutoProcessor, LlavaForConditionalGeneration

from skipvision.cli import main
from skipvision.data.tokenizer import load_tokenizer
from skipvision.inference import GenerationConfig, Request, VLMGenerator
from skipvision.weights.strict import WeightsMismatchError

from .test_llava_import import clip_processor, photo, tiny_llava


@pytest.fixture(scope="module")
def llava_folder(tiny_shapes: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("llava")
    tokenizer = load_tokenizer(tiny_shapes / "tokenizer")
    tiny_llava(tokenizer).save_pretrained(folder)
    clip_processor().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def workflow_overrides(llava_folder: Path, tiny_shapes: Path, run: Path, *extra: str) -> list[str]:
    """The shipped recipe of this workflow, pointed at the tiny folder and shrunk to run here in seconds."""
    folder = str(llava_folder)
    return [
        f"data.root={tiny_shapes}",
        f"data.train_shards={tiny_shapes}/train/*.tar",
        f"data.val_shards={tiny_shapes}/val/*.tar",
        f"data.tokenizer={folder}",
        "data.batch_size=4",
        "data.val_batch_size=8",
        "data.num_workers=0",
        "data.max_length=1024",  # the llava_v1 system prompt is long in a 300-token vocabulary
        f"output_dir={run}",
        f"model.encoder.path={folder}",
        f"model.projector.weights={folder}",
        f"model.backbone.path={folder}",
        "model.skip.policy.num_retained=4",  # 16 patches: 4 retained, 12 merged to 4
        "model.skip.num_skipped=4",
        "optim.warmup_steps=1",
        "trainer.max_steps=3",
        "trainer.devices=1",
        "trainer.strategy=auto",
        "trainer.accelerator=cpu",
        "trainer.precision=32-true",
        "trainer.limit_val_batches=1",
        "trainer.logger=csv",
        "trainer.enable_progress_bar=false",
        "checkpoint.every_n_steps=null",
        *extra,
    ]


def test_import_fit_export_move_and_generate(llava_folder: Path, tiny_shapes: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    base = tmp_path / "base"  # a copy of the pretrained folder, deleted before the export is loaded
    shutil.copytree(llava_folder, base)
    overrides = workflow_overrides(base, tiny_shapes, run)
    assert main(["fit", "--recipe", "llava15-import", *overrides]) == 0
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
    from_run = VLMGenerator.from_checkpoint(moved_run)  # a run still builds from its base folder, then its weights
    shutil.rmtree(base)
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


def test_a_model_without_skipping_exports_in_the_llava_layout(
    llava_folder: Path, tiny_shapes: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--format llava-hf``: transformers' LlavaForConditionalGeneration loads the fine-tuned model and gives its
    logits and greedy tokens; a Skip-Vision model is refused in one line."""
    run = tmp_path / "run"
    no_skip = ("model.skip.policy=none", "model.skip.num_skipped=null", "model.encoder.pad_to_square=false")
    full = workflow_overrides(llava_folder, tiny_shapes, run, *no_skip)
    full.remove("model.skip.policy.num_retained=4")
    assert main(["fit", "--recipe", "llava15-import", *full]) == 0
    out = tmp_path / "llava-hf"
    assert main(["export", "--checkpoint", str(run), "--out", str(out), "--format", "llava-hf"]) == 0
    theirs = LlavaForConditionalGeneration.from_pretrained(out).eval()
    ours = VLMGenerator.from_checkpoint(run)
    image = tmp_path / "photo.png"
    photo(40, 32, 6).save(image)
    request = Request("What colour is the circle?", image)
    (encoded,) = ours.encode([request])
    ids, pixels = torch.tensor([encoded.ids]), encoded.pixels[None]
    with torch.no_grad():
        want = theirs(input_ids=ids, pixel_values=pixels).logits
        got = ours.model(ids, torch.ones_like(ids), pixels, torch.tensor([1])).logits
        hf = theirs.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=5, do_sample=False, eos_token_id=None)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    (answer,) = ours.generate([request], GenerationConfig(max_new_tokens=5))
    generated = hf[0, ids.shape[1] :].tolist()
    assert answer.token_ids == generated[: len(answer.token_ids)]

    # transformers' own processor, saved with it, expands <image> and prepares the pixels the same way.
    processor = AutoProcessor.from_pretrained(out)
    text = "USER: <image>\nWhat colour is the circle?\nASSISTANT:"
    inputs = processor(images=Image.open(image), text=text, return_tensors="pt")
    assert inputs["input_ids"].eq(ours.model.image_token_id).sum() == ours.model.num_image_tokens
    torch.testing.assert_close(inputs["pixel_values"][0], encoded.pixels, rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(
            theirs(**inputs).logits,
            ours.model(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"], torch.tensor([1])).logits,
            rtol=1e-5,
            atol=1e-5,
        )

    skipping = tmp_path / "skip-run"
    assert main(["fit", "--recipe", "llava15-import", *workflow_overrides(llava_folder, tiny_shapes, skipping)]) == 0
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(skipping), "--out", str(tmp_path / "no"), "--format", "llava-hf"]) == 2
    assert "--format llava-hf holds no skipping" in capsys.readouterr().err
