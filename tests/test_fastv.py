"""FastV peer (docs/method.md "Peers") on a tiny random Llama (fp32, CPU): sdpa against eager, the exact drop counts,
hook removal and errors. Equality with a reference forward on every family is in tests/test_families.py."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, DynamicCache

from skipvision.adapters import decoder_layers
from skipvision.model import positions_from_mask
from skipvision.registry import SKIP_POLICIES
from skipvision.skip.fastv import fastv_prefill
from skipvision.skip.layout import SlotLayout
from skipvision.skip.policies.base import DropStage
from skipvision.skip.visual import SkipVisionTokens

from .conftest import tiny_lm_config

LAYERS = 3  # so that K = 1 and K = 2 both leave layers after the pruning
RATIO = 0.5
NEXT_TOKEN = 5


def tiny_lm(model_type: str, attn: str) -> nn.Module:
    torch.manual_seed(0)
    cfg = tiny_lm_config(model_type, num_hidden_layers=LAYERS)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def models() -> dict[tuple[str, str], nn.Module]:
    """(model_type, attention implementation) -> model; both implementations of a type share the weights."""
    return {("llama", attn): tiny_lm("llama", attn) for attn in ("sdpa", "eager")}


def make_batch(kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Embeddings [2, 16, 64], left-padded mask [2, 16] and image slots [2, 16] of two prompts ending in text.

    ``text_only``: row 0 (3 pads) has 8 image slots, row 1 none, so row 1 drops nothing and the cache keeps T
    positions, row 0's dropped ones as masked fillers. ``two_images``: 6 and 9 slots (two images in row 1), so both
    rows drop and the cache really shrinks."""
    embeds = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 16, dtype=torch.long)
    slots = torch.zeros(2, 16, dtype=torch.bool)
    if kind == "text_only":
        mask[0, :3] = 0
        slots[0, 5:13] = True
    else:
        mask[0, :2] = 0
        slots[0, 4:10] = True
        slots[1, [2, 3, 4, 5, 8, 9, 10, 11, 12]] = True
    return embeds, mask, slots


def prefill(model: nn.Module, embeds, mask, slots, layer: int, ratio: float = RATIO):
    cache = DynamicCache(config=model.config)
    out = fastv_prefill(model, embeds, mask, positions_from_mask(mask), slots, cache, layer, ratio)
    return out, cache


@pytest.mark.parametrize("kind", ["text_only", "two_images"])
def test_sdpa_and_eager_agree(models, kind: str) -> None:
    embeds, mask, slots = make_batch(kind)
    sdpa, sdpa_cache = prefill(models["llama", "sdpa"], embeds, mask, slots, 1)
    eager, eager_cache = prefill(models["llama", "eager"], embeds, mask, slots, 1)
    assert torch.equal(sdpa.removal.index, eager.removal.index)
    assert torch.equal(sdpa.removal.valid, eager.removal.valid)
    assert (sdpa.logits - eager.logits).abs().max().item() < 1e-5
    assert sdpa.kv_bytes_before == eager.kv_bytes_before
    real = mask.gather(1, sdpa.removal.index).bool()  # [B, K]: not padding, whose fully masked queries differ
    for a, b in zip(sdpa_cache.layers, eager_cache.layers, strict=True):
        torch.testing.assert_close(a.keys.transpose(1, 2)[real], b.keys.transpose(1, 2)[real], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.values.transpose(1, 2)[real], b.values.transpose(1, 2)[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.7, 0.99])
def test_each_row_drops_floor_ratio_times_its_image_slots(models, ratio: float) -> None:
    embeds, mask, slots = make_batch("two_images")
    text_embeds, text_mask, text_slots = make_batch("text_only")
    for e, m, s in ((embeds, mask, slots), (text_embeds, text_mask, text_slots)):
        out, _ = prefill(models["llama", "sdpa"], e, m, s, 2, ratio)
        dropped = [sorted(set(range(16)) - set(out.removal.index[b][out.removal.valid[b]].tolist())) for b in (0, 1)]
        counts = [int(s[b].sum()) for b in (0, 1)]
        assert [len(d) for d in dropped] == [math.floor(ratio * n) for n in counts]
        assert all(bool(s[b, d].all()) for b, d in enumerate(dropped))  # only image slots are dropped


def test_hooks_are_removed_afterwards_even_on_error(models) -> None:
    model = models["llama", "sdpa"]
    embeds, mask, slots = make_batch("two_images")
    plain_args = {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": positions_from_mask(mask)}
    with torch.no_grad():
        before = model(**plain_args).logits
    prefill(model, embeds, mask, slots, 1)
    with pytest.raises(RuntimeError):  # the hidden size is wrong: fails inside the hooked forward
        prefill(model, torch.randn(2, 16, 65), mask, slots, 1)
    assert all(not layer._forward_pre_hooks for layer in decoder_layers(model))
    with torch.no_grad():
        assert torch.equal(model(**plain_args).logits, before)


def test_invalid_arguments_raise_naming_the_valid_range(models) -> None:
    model = models["llama", "sdpa"]
    embeds, mask, slots = make_batch("two_images")
    with pytest.raises(ValueError, match=r"layer \(K\) must be in \[1, 2\] for this 3-layer backbone, got 3"):
        prefill(model, embeds, mask, slots, 3)
    with pytest.raises(ValueError, match=r"must be >= 1, got 0"):
        prefill(model, embeds, mask, slots, 0)
    for ratio in (0.0, 1.0, -0.5):
        with pytest.raises(ValueError, match=r"ratio \(share of image tokens dropped\) must be in \(0, 1\)"):
            prefill(model, embeds, mask, slots, 1, ratio)
    with pytest.raises(ValueError, match=r"must be in \(0, 1\), got 1.5"):
        SKIP_POLICIES.build({"name": "fastv", "layer": 2, "ratio": 1.5})
    ends_in_image = slots.clone()
    ends_in_image[:, -1] = True
    with pytest.raises(ValueError, match="last prompt position is an image slot"):
        prefill(model, embeds, mask, ends_in_image, 1)
    with pytest.raises(ValueError, match="prompts must be left-padded"):
        prefill(model, embeds, mask.flip(1), slots.flip(1), 1)


def test_policy_keeps_every_token_at_the_token_stage() -> None:
    policy = SKIP_POLICIES.build(SKIP_POLICIES.tiny_spec("fastv"))
    assert (policy.layout(6, None, True), policy.layer, policy.ratio) == (SlotLayout(6), 1, 0.5)
    assert policy.drop_stages(4, training=False) == (DropStage(1, 0.5),)
    assert policy.drop_stages(4, training=True) == ()  # training-free: its training step is the full model's
    visual = SkipVisionTokens(num_tokens=6, dim=8, policy={"name": "fastv", "layer": 2, "ratio": 0.5})
    feats = torch.randn(3, 6, 8)
    tokens = visual(feats, None)
    assert visual.num_slots == 6 and tokens.tokens is feats and bool(tokens.ffn.all())
