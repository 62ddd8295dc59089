"""Analytic vs measured FLOPs (docs/method.md "Costs"): plain decoders, Skip-FFN savings, training steps, CPU SDPA.

Tiny random Llama / Qwen2 / Mistral models built from configs, fp32, CPU: nothing is downloaded.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn
from torch.utils import flop_counter as torch_flop_counter
from transformers import AutoModelForCausalLM

from skipvision.flops import (
    CPU_SDPA_FLOP_FORMULAS,
    LLMShape,
    analytic_forward_breakdown,
    analytic_forward_flops,
    analytic_train_step_flops,
    measured_flops,
)
from skipvision.skip.ffn import SkipFFN

from .conftest import tiny_lm_config
from .families import FAMILIES, tiny_lm

B, T = 2, 48


def tiny_config(model_type: str = "llama") -> object:
    """A 2-layer GQA config (d=64, f=176, 4 heads, 2 kv heads, V=97)."""
    return tiny_lm_config(model_type)


def new_lm(model_type: str = "llama", attn: str = "sdpa") -> nn.Module:
    """A fresh tiny random causal LM (fixed seed)."""
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(model_type), attn_implementation=attn)


@functools.cache
def cached_lm(model_type: str = "llama", attn: str = "sdpa") -> nn.Module:
    """A shared tiny LM for the tests that do not change its parameters' ``requires_grad``."""
    return new_lm(model_type, attn)


def input_ids() -> torch.Tensor:
    return torch.randint(0, 97, (B, T), generator=torch.Generator().manual_seed(0))  # [B, T]


def forward_flops(model: nn.Module, count_cpu_sdpa: bool = True) -> int:
    model.eval()
    ids = input_ids()
    with torch.no_grad():
        return measured_flops(lambda: model(ids).logits, count_cpu_sdpa=count_cpu_sdpa)


def train_flops(model: nn.Module, count_cpu_sdpa: bool = True, **inputs: torch.Tensor) -> int:
    model.train()
    inputs = inputs or {"input_ids": input_ids()}
    try:
        return measured_flops(lambda: model(**inputs).logits.sum(), backward=True, count_cpu_sdpa=count_cpu_sdpa)
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


def ffn_plan(k: int) -> torch.Tensor:
    """[B, T] bool: k random tokens per sample run the FFN."""
    g = torch.Generator().manual_seed(1)
    order = torch.rand(B, T, generator=g).argsort(dim=1)
    return order < k


# ---------------------------------------------------------------- analytic model


def test_shape_from_config() -> None:
    shape = LLMShape.from_config(tiny_config("qwen2"))
    assert shape == LLMShape(hidden=64, intermediate=176, layers=2, heads=4, kv_heads=2, head_dim=16, vocab=97)
    cfg = tiny_config("llama")
    cfg.head_dim = 8  # explicit head_dim wins over hidden / heads
    assert LLMShape.from_config(cfg).head_dim == 8


def test_breakdown_by_hand() -> None:
    shape = LLMShape(hidden=64, intermediate=176, layers=2, heads=4, kv_heads=2, head_dim=16, vocab=97)
    terms = analytic_forward_breakdown(shape, seq_len=10, ffn_tokens=[3, 10], batch=2, logits_tokens=1)
    assert terms == {
        "attn_proj": 2 * 2 * 10 * (4 * 64 * 64 + 4 * 64 * 32),
        "attn_scores": 2 * 2 * 4 * 16 * 4 * 10 * 10,
        "ffn": 2 * (3 + 10) * 6 * 64 * 176,
        "lm_head": 2 * 1 * 2 * 64 * 97,
    }
    causal = analytic_forward_breakdown(shape, seq_len=10, batch=2, causal=True)
    assert causal["attn_scores"] == terms["attn_scores"] * 55 // 100  # 10*11/2 of the 100 (query, key) pairs
    assert analytic_forward_flops(shape, 10, [3, 10], 2, 1) == sum(terms.values())
    with pytest.raises(ValueError, match="one per layer"):
        analytic_forward_flops(shape, 10, [3])
    with pytest.raises(ValueError, match="ffn_tokens"):
        analytic_forward_flops(shape, 10, 11)


# ---------------------------------------------------------------- analytic vs measured


@functools.cache
def family_lm(family: str, attn: str | None = None) -> nn.Module:
    """A supported family's tiny model (tests/families.py), shared by the tests that do not change it."""
    return tiny_lm(family, attn)


@pytest.mark.parametrize("attn", [None, "eager"])
@pytest.mark.parametrize("family", FAMILIES)
def test_forward_matches_analytic(family: str, attn: str | None) -> None:
    """Both attention paths count the full T x T score square (SDPA kernel formula; eager bmm shapes); every
    supported family has the analytic model's matmuls (fused or not, with or without q/k norms and soft-capping)."""
    model = family_lm(family, attn)
    expected = analytic_forward_flops(LLMShape.from_config(model.config), T, batch=B)
    assert forward_flops(model) == pytest.approx(expected, rel=0.02)


@pytest.mark.parametrize("layers", [None, [0]])
@pytest.mark.parametrize("family", FAMILIES)
def test_skip_ffn_saves_exactly_the_skipped_ffn_flops(family: str, layers: list[int] | None) -> None:
    model = family_lm(family)
    shape = LLMShape.from_config(model.config)
    k = 12
    full = forward_flops(model)
    with SkipFFN(model, layers=layers) as skip:
        skip.set_plan(ffn_plan(k))
        skipped = forward_flops(model)
    hooked = range(shape.layers) if layers is None else layers
    ffn_tokens = [k if i in hooked else T for i in range(shape.layers)]
    saved = B * (T - k) * len(hooked) * 3 * 2 * shape.hidden * shape.intermediate
    assert full - skipped == saved  # pure matmuls without bias: exact
    assert skipped == pytest.approx(analytic_forward_flops(shape, T, ffn_tokens, batch=B), rel=0.02)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_train_step_matches_analytic(attn: str) -> None:
    """Linear layers 3x forward; scores 3.5x with the fused SDPA backward (recomputes Q K^T), 3x eager."""
    model = cached_lm("llama", attn)
    shape = LLMShape.from_config(model.config)
    assert train_flops(model) == pytest.approx(analytic_train_step_flops(shape, T, batch=B, attention=attn), rel=0.02)
    k = 20
    with SkipFFN(model) as skip:
        skip.set_plan(ffn_plan(k))
        measured = train_flops(model)
    assert measured == pytest.approx(analytic_train_step_flops(shape, T, k, batch=B, attention=attn), rel=0.02)


def test_train_step_frozen_llm() -> None:
    """Frozen weights, trainable inputs (a frozen LLM under a trained projector): linear layers 2x forward."""
    model = new_lm("llama", "sdpa")
    model.requires_grad_(False)
    embeds = model.get_input_embeddings()(input_ids()).detach().requires_grad_(True)  # [B, T, D]
    expected = analytic_train_step_flops(LLMShape.from_config(model.config), T, batch=B, weight_grads=False)
    assert train_flops(model, inputs_embeds=embeds) == pytest.approx(expected, rel=0.02)


# ---------------------------------------------------------------- CPU SDPA is really counted


def test_cpu_sdpa_counted() -> None:
    """The CPU SDPA kernels account for exactly the analytic score term, forward (1x) and training step (3.5x)."""
    model = cached_lm("llama", "sdpa")
    scores = analytic_forward_breakdown(LLMShape.from_config(model.config), T, batch=B)["attn_scores"]
    assert forward_flops(model) - forward_flops(model, count_cpu_sdpa=False) == pytest.approx(scores, rel=0.02)
    assert train_flops(model) - train_flops(model, count_cpu_sdpa=False) == pytest.approx(3.5 * scores, rel=0.02)


def test_cpu_sdpa_counted_without_torch_formulas(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a registry that lacks the CPU SDPA kernels (older torch, e.g. 2.13), this module alone counts them."""
    stripped = {op: f for op, f in torch_flop_counter.flop_registry.items() if op not in CPU_SDPA_FLOP_FORMULAS}
    monkeypatch.setattr(torch_flop_counter, "flop_registry", stripped)
    model = cached_lm("llama", "sdpa")
    shape = LLMShape.from_config(model.config)
    assert forward_flops(model) == pytest.approx(analytic_forward_flops(shape, T, batch=B), rel=0.02)
    assert train_flops(model) == pytest.approx(analytic_train_step_flops(shape, T, batch=B), rel=0.02)
