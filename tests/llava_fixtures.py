"""The ``data llava`` tests' LLaVA-format fixture (scripts/make_llava_fixture.py), its conversion and readers of
the converted shards; registered as fixtures for the whole suite by tests/conftest.py (``pytest_plugins``)."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest
import webdataset as wds

from skipvision.data.llava import ConvertSettings, convert_llava
from skipvision.data.pipeline import SampleEncoder
from skipvision.data.samples import image_keys
from skipvision.data.tokenizer import IMAGE_TOKEN, load_tokenizer, prepare_tokenizer
from skipvision.data.views import image_transform

from .processes import REPO

SCRIPT = runpy.run_path(str(REPO / "scripts" / "make_llava_fixture.py"))
SETTINGS = ConvertSettings(val_fraction=0.1, shard_bytes=8000)
NUM = 48
NUM_VAL = 4  # round(0.1 * 42 accepted)
CLI_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def fixture(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return SCRIPT["make_fixture"](tmp_path_factory.mktemp("fixture"), num=NUM)


@pytest.fixture(scope="module")
def records(fixture: dict[str, Path]) -> dict[str, dict]:
    return {r["id"]: r for r in json.loads(fixture["json"].read_text())}


@pytest.fixture(scope="module")
def converted(fixture: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("converted") / "llava"
    convert_llava(fixture["json"], fixture["images"], out, SETTINGS)
    return out


@pytest.fixture(scope="module")
def tokenizer(fixture: dict[str, Path]):
    return prepare_tokenizer(load_tokenizer(fixture["tokenizer"]))


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def raw_samples(out: Path) -> dict[str, dict]:
    """Every sample of the converted set by original id: its json and its members' bytes (name order)."""
    meta = json.loads((out / "meta.json").read_text())
    samples = {}
    for shard in meta["train_shards"] + meta["val_shards"]:
        for sample in wds.WebDataset(str(out / shard), shardshuffle=False):
            info = json.loads(sample["json"])
            images = {k: sample[k] for k in image_keys(sample)}
            samples[info["id"]] = {"key": sample["__key__"], "json": info, "images": images}
    return samples


def sample_encoder(tokenizer, num_image_tokens: int = 3) -> SampleEncoder:
    transform = image_transform((64, 64), (0.0,) * 3, (1.0,) * 3)
    return SampleEncoder(tokenizer, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), num_image_tokens, transform, 4096)
