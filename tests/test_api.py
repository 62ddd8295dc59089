"""The public API in skipvision/__init__.py: cheap to import, every name resolves, create_model builds what fit
builds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast

import skipvision
from skipvision.inference.generator import VLMGenerator
from skipvision.lit.run import build
from skipvision.model import VisionLanguageModel
from skipvision.recipe import load_recipe
from skipvision.registry import ENCODERS, REGISTRIES

from .conftest import TINY_RECIPE

REPO = Path(__file__).resolve().parent.parent
SKIP = ["model.skip.policy={name: attention_score, num_retained: 4}", "model.skip.num_skipped=4"]

IMPORT_PROBE = """
import sys
import skipvision
skipvision.load_recipe("shapes-tiny")
assert isinstance(skipvision.SkipvisionError("x"), Exception) and skipvision.ENCODERS.listing()
print(skipvision.__version__, sorted(m for m in ("torch", "transformers", "lightning", "timm") if m in sys.modules))
"""


def test_import_skipvision_and_its_light_names_load_no_torch() -> None:
    done = subprocess.run([sys.executable, "-c", IMPORT_PROBE], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{skipvision.__version__} []\n"


def test_every_public_name_resolves() -> None:
    for name in skipvision.__all__:
        getattr(skipvision, name)  # AttributeError for a listed name that does not load
    assert skipvision.VLMGenerator is VLMGenerator and skipvision.ENCODERS is ENCODERS
    assert skipvision.REGISTRIES is REGISTRIES and skipvision.load_recipe is load_recipe
    assert set(skipvision.__all__) <= set(dir(skipvision))


def test_create_model_builds_the_model_fit_starts_from(tiny_shapes: Path, tmp_path: Path) -> None:
    overrides = [f"data.root={tiny_shapes}", f"output_dir={tmp_path / 'run'}", *SKIP]
    model, tokenizer = skipvision.create_model(TINY_RECIPE, overrides)
    assert isinstance(model, VisionLanguageModel) and isinstance(tokenizer, PreTrainedTokenizerFast)
    assert model.num_image_tokens == 4 + 1 + 4 + 1  # [R][s_R][S][s_S]
    assert model.image_token_id == tokenizer.convert_tokens_to_ids("<image>")

    module, _, _ = build(load_recipe(TINY_RECIPE, overrides))
    trained_from = module.model.state_dict()
    assert list(model.state_dict()) == list(trained_from)
    assert all(torch.equal(t, trained_from[k]) for k, t in model.state_dict().items())

    smaller, _ = skipvision.create_model(load_recipe(TINY_RECIPE, overrides), ["model.skip.num_skipped=2"])
    assert smaller.num_image_tokens == 4 + 1 + 2 + 1
    full, same_tokenizer = skipvision.create_model(TINY_RECIPE, overrides[:1], tokenizer=tiny_shapes / "tokenizer")
    assert full.num_image_tokens == 16 and same_tokenizer.get_vocab() == tokenizer.get_vocab()
