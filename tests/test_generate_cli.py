"""Loading a trained run without Lightning, ``python -m skipvision generate`` (one request and JSONL batch mode), and
validation through the same generation path."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from skipvision.cli import main
from skipvision.inference import GenerationConfig, Request, VLMGenerator
from skipvision.inference.checkpoint import CheckpointError, load_model, locate
from skipvision.lit.module import VLMLitModule
from skipvision.recipe import load_recipe


@pytest.fixture(scope="module")
def run(tiny_skip_run: Path) -> Path:
    """A 2-step Skip-Vision fit of the tiny recipe (tests/conftest.py)."""
    return tiny_skip_run


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("img") / "shape.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path)
    return path


def test_checkpoint_paths_resolve_and_weights_load_exactly(run: Path) -> None:
    files = locate(run)
    assert locate(run / "checkpoints") == files
    assert locate(run / "checkpoints" / "step=2.ckpt").weights == run / "checkpoints" / "step=2.ckpt"
    model, _, recipe = load_model(run)
    assert recipe.model.skip.num_skipped == 4 and not model.training
    state = torch.load(files.weights, map_location="cpu", weights_only=True)["state_dict"]
    loaded = model.state_dict()
    assert set(loaded) == {k.removeprefix("model.") for k in state}
    assert all(torch.equal(loaded[k.removeprefix("model.")], v) for k, v in state.items())


def test_missing_checkpoint_files_are_named(run: Path, tmp_path: Path, capsys) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    shutil.rmtree(broken / "tokenizer")
    (broken / "checkpoints" / "last.ckpt").unlink()
    with pytest.raises(CheckpointError, match=r"missing: weights \(.*last.ckpt\); tokenizer \(.*tokenizer.json\)"):
        locate(broken)
    assert main(["generate", "--checkpoint", str(tmp_path / "nowhere"), "--prompt", "hi"]) == 2
    assert "no checkpoint at" in capsys.readouterr().err


def test_cli_one_request_with_stats_equals_the_api(run: Path, image: Path, capsys) -> None:
    gen = VLMGenerator.from_checkpoint(run)
    [want] = gen.generate([Request("What colour is the circle?", image)], GenerationConfig(max_new_tokens=3))
    args = ["generate", "--checkpoint", str(run), "--image", str(image), "--prompt", "What colour is the circle?"]
    assert main([*args, "--max-new-tokens", "3", "--stats"]) == 0
    text, stats = capsys.readouterr().out.splitlines()[-2:]
    assert text == want.text
    kept = want.stats.kv_bytes_kept
    assert "time to first token" in stats and "ms/token" in stats
    assert f"{want.stats.kv_bytes_prefill:,} B after prefill -> {kept:,} B after removal" in stats
    assert main([*args, "--max-new-tokens", "3", "--stats", "--no-drop-kv"]) == 0
    stats = capsys.readouterr().out.splitlines()[-1]
    assert f"{want.stats.kv_bytes_prefill:,} B after prefill -> {want.stats.kv_bytes_prefill:,} B" in stats


def test_cli_jsonl_batch_mode(run: Path, image: Path, tmp_path: Path, capsys) -> None:
    shutil.copy(image, tmp_path / "a.png")
    rows = [
        {"id": "q1", "prompt": "What colour is the circle?", "image": "a.png"},
        {"id": "q2", "prompt": "Say hello"},
        {"id": "q3", "prompt": "<image>\nHow many shapes?", "image": str(image)},
    ]
    requests = tmp_path / "in.jsonl"
    requests.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "out.jsonl"
    argv = ["generate", "--checkpoint", str(run), "--requests", str(requests), "--output", str(out)]
    assert main([*argv, "--batch-size", "2", "--max-new-tokens", "3"]) == 0
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    gen = VLMGenerator.from_checkpoint(run)
    want = gen.generate(
        [Request(rows[0]["prompt"], tmp_path / "a.png"), Request(rows[1]["prompt"]), Request(rows[2]["prompt"], image)],
        GenerationConfig(max_new_tokens=3),
    )
    assert [a["id"] for a in answers] == ["q1", "q2", "q3"]
    assert [a["text"] for a in answers] == [w.text for w in want]
    assert answers[1]["stats"]["kv_bytes_kept"] == answers[1]["stats"]["kv_bytes_prefill"]  # text-only
    assert answers[0]["stats"]["kv_bytes_kept"] < answers[0]["stats"]["kv_bytes_prefill"]

    requests.write_text(json.dumps(rows[0]) + "\n{not json\n")
    assert main(argv) == 2
    assert f"{requests}:2: not valid JSON" in capsys.readouterr().err
    requests.write_text(json.dumps({"prompt": "<image> <image>", "image": "a.png"}) + "\n")
    assert main(argv) == 2
    assert "request 0: prompt has 2 <image> placeholder(s) but 1 image(s)" in capsys.readouterr().err


def test_validation_decodes_with_removal_unless_switched_off(run: Path) -> None:
    recipe = load_recipe(run / "recipe.yaml")
    module = VLMLitModule(OmegaConf.to_container(recipe, resolve=True), str(run / "tokenizer"))
    assert module.generation.drop_kv is True
    off = load_recipe(run / "recipe.yaml", ["eval.drop_kv=false"])
    assert VLMLitModule(OmegaConf.to_container(off, resolve=True), str(run / "tokenizer")).generation.drop_kv is False
