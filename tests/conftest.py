"""Shared fixtures: offline mode, a tiny shapes dataset, and a tiny recipe that trains in seconds."""

from __future__ import annotations

import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from transformers import AutoConfig, PretrainedConfig

from skipvision.backbones.hf_causal_lm import TINY_LLAMA
from skipvision.data.shapes import generate_shapes

pytest_plugins = ["tests.llava_fixtures"]  # the data llava fixture, shared by its test files

torch.set_num_threads(2)
TESTS = Path(__file__).resolve().parent
TINY_RECIPE = TESTS / "recipes" / "tiny.yaml"
TINY_VOCAB = 97


def tiny_lm_config(model_type: str = "llama", **overrides: object) -> PretrainedConfig:
    """The registry's tiny backbone config (d=64, f=176, 2 layers, 4 heads, 2 kv heads) of ``model_type``, with a
    97-token vocabulary; ``overrides`` replace single fields."""
    return AutoConfig.for_model(
        **{**TINY_LLAMA["config"], "model_type": model_type, "vocab_size": TINY_VOCAB, **overrides}
    )


@pytest.fixture(scope="session")
def tiny_shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """64 train samples (2 questions and a caption each) and 24 val samples of 32x32 shapes, 32 a shard.

    The settings match tests/recipes/tiny.yaml, so fits with that recipe reuse this dataset."""
    root = tmp_path_factory.mktemp("data") / "shapes"
    generate_shapes(
        root,
        num_train=64,
        num_val=24,
        seed=0,
        image_size=32,
        shard_size=32,
        vocab_size=300,
        train_questions=2,
        train_describe=True,
    )
    return root


@pytest.fixture(scope="session")
def tiny_skip_run(tiny_shapes: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-step Skip-Vision fit of the tiny recipe (4 retained tokens, 4 skipped), shared by the tests that load a
    trained run; they must not change it."""
    from skipvision.cli import main

    out = tmp_path_factory.mktemp("tiny_skip") / "run"
    skip = ["model.skip.policy={name: attention_score, num_retained: 4}", "model.skip.num_skipped=4"]
    assert main(["fit", "--recipe", str(TINY_RECIPE), f"data.root={tiny_shapes}", f"output_dir={out}", *skip]) == 0
    return out


@pytest.fixture
def tiny_overrides(tiny_shapes: Path, tmp_path: Path) -> list[str]:
    """Overrides that point the tiny recipe at the session's dataset and a fresh run folder."""
    return [f"data.root={tiny_shapes}", f"output_dir={tmp_path / 'run'}"]
