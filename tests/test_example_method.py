"""The third-party example method (examples/norm_skip.py; docs/methods.md "Write your own method"): one short file,
written against the method interface only, loaded through a recipe's ``imports:``. Its logits equal a hand-written
layer loop, its measured prefill FLOPs equal its own schedule, and ``fit`` + ``generate`` run it through the CLI."""

from __future__ import annotations

import importlib
import os
import re
import sys
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

from skipvision.costs import model_schedule, prefill_flops
from skipvision.flops import LLMShape, measured_flops
from skipvision.model import positions_from_mask
from skipvision.recipe import load_recipe
from skipvision.registry import SKIP_POLICIES
from skipvision.skip.in_llm import prefill

from .cli_runs import fit_and_generate
from .processes import REPO
from .test_mod_router import layer_loop_logits, lowest_by_hand
from .test_model import make_batch
from .test_pyramid_drop import build, tokenizer  # noqa: F401 (a fixture)

EXAMPLES = REPO / "examples"
TIMEOUT_S = 300


@pytest.fixture
def norm_skip(monkeypatch: pytest.MonkeyPatch):
    """The example imported as a recipe's ``imports:`` does; it leaves the registry as it found it."""
    SKIP_POLICIES.names()
    monkeypatch.setattr(SKIP_POLICIES, "_entries", dict(SKIP_POLICIES._entries))
    monkeypatch.syspath_prepend(str(EXAMPLES))
    sys.modules.pop("norm_skip", None)
    yield importlib.import_module("norm_skip")
    sys.modules.pop("norm_skip", None)


def test_the_example_is_one_short_file_and_its_recipe_loads_it() -> None:
    assert len((EXAMPLES / "norm_skip.py").read_text().splitlines()) < 80
    recipe = load_recipe(EXAMPLES / "norm_skip.yaml")
    assert list(recipe.imports) == ["norm_skip"] and recipe.model.skip.policy.name == "norm_skip"


@pytest.mark.usefixtures("norm_skip")
def test_logits_equal_the_layer_loop_and_prefill_flops_its_schedule(tokenizer) -> None:  # noqa: F811
    """From layer 1 on, each row's half of image slots with the smallest input norm get a zero MLP output."""
    model = build(tokenizer, {"name": "norm_skip", "start": 1, "share": 0.5}).eval()
    batch = make_batch(tokenizer, model)  # one image, two images, text only
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        logits = model(ids, mask, batch["pixel_values"], batch["num_images"]).logits  # [B, T, V]
        embedded = model.embed(ids, batch["pixel_values"], batch["num_images"])

        def gate_of(i: int, h: torch.Tensor) -> torch.Tensor:
            gate = torch.ones(h.shape[:2])  # [B, T]
            for b in range(h.shape[0]) if i >= 1 else ():
                skipped = lowest_by_hand(h[b].norm(dim=-1), embedded.visual_slots[b].nonzero().flatten(), 0.5)
                gate[b, skipped] = 0
            return gate

        reference = layer_loop_logits(model, embedded.embeds, mask, gate_of)
    assert (logits - reference).abs().max().item() < 1e-5

    # One prompt with one image (row 0 without its right padding): the prefill's FLOPs against the method's schedule.
    n = int(mask[0].sum())
    assert bool(mask[0, :n].all())
    prompt, prompt_mask = ids[:1, :n], mask[:1, :n]
    one = model.embed(prompt, batch["pixel_values"][:1], torch.tensor([1]))
    positions = positions_from_mask(prompt_mask)
    cache = DynamicCache(config=model.backbone.config)
    measured = measured_flops(lambda: prefill(model, one, prompt_mask, positions, cache))
    schedule = model_schedule(model, n - model.num_image_tokens)
    assert [layer.present - layer.ffn for layer in schedule.layers] == [0] + [8] * 3  # half of 16 slots from layer 1
    assert measured == prefill_flops(LLMShape.from_config(model.backbone.config), schedule)


def test_fit_and_generate_through_the_cli(tiny_overrides: list[str], tmp_path: Path) -> None:
    """The recipe's ``imports:`` loads the example in ``fit`` and again in ``generate`` (the run's recipe keeps it)."""
    env = {"PYTHONPATH": os.pathsep.join([str(REPO), str(EXAMPLES)])}
    method = ["imports=[norm_skip]", "model.skip.policy={name: norm_skip, start: 1, share: 0.5}"]
    done = fit_and_generate([*tiny_overrides, *method], tmp_path, TIMEOUT_S, "--stats", **env)
    assert done.losses, done.fit_log
    stats = next(line for line in done.generated if "B after prefill" in line)
    found = re.search(r"KV cache ([\d,]+) B after prefill -> ([\d,]+) B after removal", stats)
    assert found is not None, stats
    assert found[1] == found[2] != "0"  # norm_skip keeps every position cached
