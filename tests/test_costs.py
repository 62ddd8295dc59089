"""The one token-count model (docs/method.md "Costs"): per-layer schedules by hand for every method, derived from
built models, and their prefill FLOPs equal to what FlopCounterMode measures on a tiny real LLM."""

from __future__ import annotations

import functools

import pytest
import torch
from transformers import DynamicCache

from skipvision.adapters import adapter_for, decoder_layers
from skipvision.costs import (
    LayerTokens,
    TokenSchedule,
    counts_schedule,
    decode_step_flops,
    forward_breakdown,
    model_schedule,
    prefill_flops,
    train_step_flops,
)
from skipvision.flops import LLMShape, analytic_forward_flops, analytic_train_step_flops, measured_flops
from skipvision.model import VisionLanguageModel, positions_from_mask
from skipvision.paper import build_meta_model
from skipvision.skip.fastv import fastv_prefill, last_token_attention
from skipvision.skip.ffn import SkipFFN

from .conftest import TESTS
from .test_fastv import LAYERS, tiny_lm

BENCH = TESTS / "recipes" / "bench-tiny.yaml"  # 16 visual tokens per image; Skip-Vision 4R + 4S + 2
SHAPE = LLMShape(hidden=64, intermediate=176, layers=3, heads=4, kv_heads=2, head_dim=16, vocab=97)


def test_full_and_merge_only_by_hand() -> None:
    full = TokenSchedule.full(3, text=10, visual=16, images=2)
    assert full == TokenSchedule((LayerTokens(42, 42),) * 3, cached=42)
    assert TokenSchedule.full(3, text=10, visual=10) == TokenSchedule((LayerTokens(20, 20),) * 3, 20)  # merge_only


def test_skip_vision_by_hand_with_skip_ffn_in_some_layers() -> None:
    """2 images of 4R + 4S + 2 slots after 10 text tokens: 30 present everywhere, 8 without FFN where hooked."""
    every = TokenSchedule.skip_vision(4, text=10, retained=4, skipped=4, summaries=2, images=2)
    assert every == TokenSchedule((LayerTokens(30, 22),) * 4, cached=22)
    some = TokenSchedule.skip_vision(4, text=10, retained=4, skipped=4, images=2, ffn_layers=(0, 2))
    assert some.layers == (LayerTokens(30, 22), LayerTokens(30, 30), LayerTokens(30, 22), LayerTokens(30, 30))
    assert some.cached == 22  # the S slots leave every layer's cache, hooked or not
    no_summaries = TokenSchedule.skip_vision(2, text=5, retained=3, skipped=2, summaries=0)
    assert no_summaries == TokenSchedule((LayerTokens(10, 8),) * 2, cached=8)


@pytest.mark.parametrize(("visual", "images", "ratio", "dropped"), [(7, 1, 0.5, 3), (10, 1, 0.7, 7), (5, 2, 0.35, 3)])
def test_fastv_by_hand_drops_the_floor(visual: int, images: int, ratio: float, dropped: int) -> None:
    tokens = 5 + visual * images
    schedule = TokenSchedule.fastv(4, text=5, visual=visual, layer=2, ratio=ratio, images=images)
    kept = tokens - dropped
    scoring = LayerTokens(tokens, tokens, scored=tokens)  # layer K - 1 = 1 ranks the drop with one attention row
    assert schedule.layers == (LayerTokens(tokens, tokens), scoring) + (LayerTokens(kept, kept),) * 2
    assert schedule.cached == kept


def test_impossible_schedules_raise() -> None:
    with pytest.raises(ValueError, match="0 <= ffn <= present"):
        LayerTokens(3, 4)
    with pytest.raises(ValueError, match="0 <= scored <= present"):
        LayerTokens(3, 3, scored=4)
    with pytest.raises(ValueError, match="cached=9"):
        TokenSchedule((LayerTokens(8, 8),), cached=9)
    with pytest.raises(ValueError, match=r"layer \(K\) must be in \[1, 3\]"):
        TokenSchedule.fastv(4, text=5, visual=8, layer=4, ratio=0.5)
    with pytest.raises(ValueError, match="inconsistent token counts"):
        counts_schedule(4, 40, visual=16, retained=16, skipped=1)
    with pytest.raises(ValueError, match="the schedule has 2 layers, the LLM 3"):
        prefill_flops(SHAPE, TokenSchedule.full(2, 5, 4))


def test_counts_schedule_is_skip_vision_with_one_image() -> None:
    assert counts_schedule(4, 40, visual=1296, retained=272, skipped=256) == TokenSchedule.skip_vision(4, 40, 272, 256)


def test_flops_of_uniform_schedules_are_the_plain_formulas() -> None:
    """A schedule whose layers are alike costs what flops.py's single-sequence formulas give; decode by hand."""
    full, skip = TokenSchedule.full(3, 20, 16), TokenSchedule.skip_vision(3, 20, 4, 4, ffn_layers=(1,))
    for causal in (False, True):
        assert prefill_flops(SHAPE, full, causal) == analytic_forward_flops(SHAPE, 36, logits_tokens=1, causal=causal)
    assert train_step_flops(SHAPE, full, batch=3) == analytic_train_step_flops(SHAPE, 36, batch=3)
    assert train_step_flops(SHAPE, skip, batch=3) == analytic_train_step_flops(SHAPE, 30, [30, 26, 30], batch=3)
    d, kv = SHAPE.hidden, SHAPE.kv_heads * SHAPE.head_dim
    per_layer = 2 * 2 * d * 64 + 2 * 2 * d * kv + 3 * 2 * d * SHAPE.intermediate + 2 * 2 * 16 * 4 * (26 + 1)
    assert decode_step_flops(SHAPE, skip) == 3 * per_layer + 2 * d * SHAPE.vocab


@functools.cache
def bench_model(*overrides: str) -> VisionLanguageModel:
    """bench-tiny's model with a 3-layer LLM, on the meta device (shapes only)."""
    return build_meta_model(str(BENCH), ["model.backbone.config.num_hidden_layers=3", *overrides])


def test_schedules_derived_from_built_models() -> None:
    assert model_schedule(bench_model(), 12) == TokenSchedule((LayerTokens(22, 18),) * 3, cached=18)
    some = model_schedule(bench_model("model.skip.layers=[0,-1]"), 12)
    assert some.layers == (LayerTokens(22, 18), LayerTokens(22, 22), LayerTokens(22, 18))
    assert model_schedule(bench_model("model.skip.policy=none"), 12) == TokenSchedule.full(3, 12, 16)
    merge = bench_model("model.skip.policy={name: merge_only, num_tokens: 10}")
    assert model_schedule(merge, 12) == TokenSchedule((LayerTokens(22, 22),) * 3, cached=22)
    fastv = bench_model("model.skip.policy={name: fastv, layer: 1, ratio: 0.5}")
    assert model_schedule(fastv, 12, images=2) == TokenSchedule.fastv(3, 12, 16, layer=1, ratio=0.5, images=2)
    assert model_schedule(fastv, 12, training=True) == TokenSchedule.full(3, 12, 16)  # training-free


# ---------------------------------------------------------------- against FlopCounterMode on a tiny real LLM

TEXT, SLOTS = 9, 10  # 6 text tokens, one image's 10 slots (4R, s_R, 4S, s_S), 3 text tokens at the end


def prompt() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Embeddings [1, T, 64], mask [1, T] and image slots [1, T] of one prompt ending in text."""
    embeds = torch.randn(1, TEXT + SLOTS, 64, generator=torch.Generator().manual_seed(0))
    slots = torch.zeros(1, TEXT + SLOTS, dtype=torch.bool)
    slots[0, 6 : 6 + SLOTS] = True
    return embeds, torch.ones(1, TEXT + SLOTS, dtype=torch.long), slots


@pytest.fixture(scope="module")
def lm() -> torch.nn.Module:
    return tiny_lm("llama", "sdpa")


@torch.no_grad()
def test_full_and_skip_vision_prefill_measure_their_schedules(lm: torch.nn.Module) -> None:
    shape, (embeds, _, slots) = LLMShape.from_config(lm.config), prompt()
    full = measured_flops(lambda: lm(inputs_embeds=embeds, logits_to_keep=1))
    assert full == prefill_flops(shape, TokenSchedule.full(LAYERS, TEXT, SLOTS))
    ffn = torch.ones_like(slots)  # [1, T]
    ffn[0, 6 + 5 : 6 + 9] = False  # the S slots, after 4R and s_R
    with SkipFFN(lm, layers=[0, 2]) as skip:
        skip.set_plan(ffn)
        skipped = measured_flops(lambda: lm(inputs_embeds=embeds, logits_to_keep=1))
    assert skipped == prefill_flops(shape, TokenSchedule.skip_vision(LAYERS, TEXT, 4, 4, ffn_layers=(0, 2)))


@torch.no_grad()
def test_fastv_prefill_measures_its_schedule_plus_the_scoring_row(lm: torch.nn.Module) -> None:
    """FastV's prefill is its schedule's FLOPs, whose ``scoring`` term is the one attention row it scores by
    in layer K - 1 (measured alone); ratio 0.45 of 10 slots drops floor(4.5) = 4."""
    shape, (embeds, mask, slots) = LLMShape.from_config(lm.config), prompt()
    positions = positions_from_mask(mask)  # [1, T]
    cache = DynamicCache(config=lm.config)
    run = measured_flops(lambda: fastv_prefill(lm, embeds, mask, positions, slots, cache, 1, 0.45))
    rotary = lm.model.rotary_emb(embeds, positions)  # (cos, sin) of layer 0's input
    adapter, layer0 = adapter_for(lm.config), decoder_layers(lm)[0]
    row = measured_flops(lambda: last_token_attention(adapter, layer0, embeds, rotary, mask))
    schedule = TokenSchedule.fastv(LAYERS, TEXT, SLOTS, layer=1, ratio=0.45)
    assert schedule.cached == TEXT + SLOTS - 4 and schedule.layers[0].scored == TEXT + SLOTS
    assert forward_breakdown(shape, schedule, 1)["scoring"] == row
    assert run == prefill_flops(shape, schedule)
