"""Analytic and measured FLOPs of a LLaMA-style decoder, with and without Skip-FFN (docs/method.md "Costs").

Analytic model (matmuls only, a multiply-add counts 2 FLOPs, so an [m, k] x [k, n] product costs ``2*m*n*k``), for
hidden ``d``, FFN width ``f``, ``h`` query heads and ``h_kv`` key/value heads of width ``hd``, vocabulary ``V``:

- ``attn_proj``   per token per layer: q and o ``2*2*d*(h*hd)``, k and v ``2*2*d*(h_kv*hd)`` (GQA shrinks k/v);
- ``attn_scores`` per query per layer: ``Q K^T`` and ``P V``, ``2*2*hd*h*n_keys``. By default ``n_keys = T`` (the
  full T x T square), because that is what fused SDPA kernels and ``torch.utils.flop_counter`` count, causal or not;
  ``causal=True`` counts only the ``i + 1`` keys query ``i`` needs (``T*(T+1)/2`` pairs per head);
- ``ffn``         per FFN token per layer: SwiGLU gate, up and down ``3*2*d*f`` (Skip-FFN drops it on skipped rows);
- ``lm_head``     per token whose logits are computed: ``2*d*V``.

Norms, activations, softmax, rotary embeddings, residual adds and biases (Qwen2's q/k/v) are ignored: they are
O(d) per token against O(d^2) for the matmuls, and FlopCounterMode does not count them either.

Training step (forward + backward), matmul rule, checked against FlopCounterMode: every linear layer costs 3x its
forward (forward, gradient of the input, gradient of the weight; 2x when the weights are frozen but the gradient still
flows to the input). Attention scores cost 3x with eager attention (two bmm, each with two backward bmm) but 3.5x with
a fused SDPA kernel, whose backward recomputes ``Q K^T`` (five matmuls against two in the forward).

Measured FLOPs use ``torch.utils.flop_counter.FlopCounterMode``. Older registries lack the CPU SDPA kernels
(``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward), so CPU attention counts 0 FLOPs there
(pytorch/pytorch#195460, seen on torch 2.13); torch 2.15 registers them.
:func:`flop_counter` always maps them to torch's own SDPA formulas, so the count is the same on every torch version.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.utils import flop_counter as _fc
from torch.utils.flop_counter import FlopCounterMode

_aten = torch.ops.aten


def _cpu_sdpa_flop(query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """``_scaled_dot_product_flash_attention_for_cpu(query, key, value, ...)``: torch's SDPA count (full square)."""
    return _fc.sdpa_flop_count(query, key, value)


def _cpu_sdpa_backward_flop(
    grad_out: Any, query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any
) -> int:
    """``..._for_cpu_backward(grad_out, query, key, value, ...)``: torch's SDPA backward count (recomputes Q K^T)."""
    return _fc.sdpa_backward_flop_count(grad_out, query, key, value)


#: FlopCounterMode formulas (shapes in, FLOPs out) for the CPU SDPA kernels, built on torch's own SDPA helpers.
CPU_SDPA_FLOP_FORMULAS: dict[Any, Callable[..., int]] = {
    _aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flop,
    _aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flop,
}


@dataclass(frozen=True)
class LLMShape:
    """The dimensions of a LLaMA-style decoder that its matmul FLOPs depend on."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def from_config(cls, config: Any) -> LLMShape:
        """Read a Llama / Qwen2 / Mistral HF config (or a VLM config, through its text config)."""
        if hasattr(config, "get_text_config"):
            config = config.get_text_config()
        heads = config.num_attention_heads
        return cls(
            hidden=config.hidden_size,
            intermediate=config.intermediate_size,
            layers=config.num_hidden_layers,
            heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            vocab=config.vocab_size,
        )


def _per_layer(shape: LLMShape, seq_len: int, ffn_tokens: int | Sequence[int] | None) -> list[int]:
    """FFN tokens per sample for each layer (``None`` = every token in every layer), validated."""
    if ffn_tokens is None:
        counts = [seq_len] * shape.layers
    elif isinstance(ffn_tokens, int):
        counts = [ffn_tokens] * shape.layers
    else:
        counts = [int(n) for n in ffn_tokens]
    if len(counts) != shape.layers:
        raise ValueError(f"ffn_tokens has {len(counts)} entries, expected one per layer ({shape.layers})")
    if any(not 0 <= n <= seq_len for n in counts):
        raise ValueError(f"ffn_tokens must lie in 0..seq_len={seq_len}, got {counts}")
    return counts


def analytic_forward_breakdown(
    shape: LLMShape,
    seq_len: int,
    ffn_tokens: int | Sequence[int] | None = None,
    batch: int = 1,
    logits_tokens: int | None = None,
    causal: bool = False,
) -> dict[str, int]:
    """Forward matmul FLOPs by term: ``attn_proj``, ``attn_scores``, ``ffn``, ``lm_head``.

    ``seq_len`` tokens per sample (padded length: kernels compute on padding too); ``ffn_tokens`` tokens per sample
    run the FFN, one int for every layer or one per layer (``None`` = all, the plain model); ``logits_tokens`` tokens
    per sample get logits (``None`` = all; HF ``logits_to_keep``). ``causal=False`` counts the full T x T score
    square as the kernels and FlopCounterMode do; ``causal=True`` counts only the causal half. FLOPs are additive
    over samples: for ragged batches or per-sample plans, sum calls with ``batch=1``.
    """
    if seq_len < 0 or batch < 0:
        raise ValueError(f"seq_len and batch must be >= 0, got {seq_len}, {batch}")
    logits = seq_len if logits_tokens is None else logits_tokens
    if not 0 <= logits <= seq_len:
        raise ValueError(f"logits_tokens must lie in 0..seq_len={seq_len}, got {logits_tokens}")
    ffn = _per_layer(shape, seq_len, ffn_tokens)
    d, hd = shape.hidden, shape.head_dim
    q_width, kv_width = shape.heads * hd, shape.kv_heads * hd
    key_pairs = seq_len * (seq_len + 1) // 2 if causal else seq_len * seq_len  # (query, key) pairs per head
    return {
        "attn_proj": batch * shape.layers * seq_len * (2 * 2 * d * q_width + 2 * 2 * d * kv_width),
        "attn_scores": batch * shape.layers * 2 * 2 * hd * shape.heads * key_pairs,
        "ffn": batch * sum(ffn) * 3 * 2 * d * shape.intermediate,
        "lm_head": batch * logits * 2 * d * shape.vocab,
    }


def analytic_forward_flops(
    shape: LLMShape,
    seq_len: int,
    ffn_tokens: int | Sequence[int] | None = None,
    batch: int = 1,
    logits_tokens: int | None = None,
    causal: bool = False,
) -> int:
    """Total forward matmul FLOPs; the arguments are those of :func:`analytic_forward_breakdown`."""
    return sum(analytic_forward_breakdown(shape, seq_len, ffn_tokens, batch, logits_tokens, causal).values())


def analytic_train_step_flops(
    shape: LLMShape,
    seq_len: int,
    ffn_tokens: int | Sequence[int] | None = None,
    batch: int = 1,
    logits_tokens: int | None = None,
    attention: Literal["sdpa", "eager"] = "sdpa",
    weight_grads: bool = True,
    causal: bool = False,
) -> int:
    """Forward + backward matmul FLOPs of one training step (rule in the module docstring).

    Linear layers: 3x forward with ``weight_grads`` (trainable weights), 2x without (frozen weights, gradient still
    flowing to the input, e.g. a frozen LLM under a trained projector). Attention scores: 3.5x forward with a fused
    ``"sdpa"`` kernel (its backward recomputes ``Q K^T``), 3x with ``"eager"`` attention. Skipped FFN rows cost
    nothing in either direction.
    """
    terms = analytic_forward_breakdown(shape, seq_len, ffn_tokens, batch, logits_tokens, causal)
    return train_step_from_forward(terms, attention, weight_grads)


def train_step_from_forward(
    terms: dict[str, int], attention: Literal["sdpa", "eager"] = "sdpa", weight_grads: bool = True
) -> int:
    """Forward + backward FLOPs from the forward's terms (:func:`analytic_forward_breakdown`'s keys), by the rule of
    :func:`analytic_train_step_flops`; for forwards summed over parts, e.g. layer by layer (skipvision/costs.py)."""
    if attention not in ("sdpa", "eager"):
        raise ValueError(f"attention must be 'sdpa' or 'eager', got {attention!r}")
    linear = terms["attn_proj"] + terms["ffn"] + terms["lm_head"]
    scores = terms["attn_scores"]  # always even: a multiple of 4
    linear += terms.get("routing", 0)  # a router is a trained linear layer
    scoring = terms.get("scoring", 0)  # counted once: no gradient reaches a drop's scores
    return (3 if weight_grads else 2) * linear + (7 * scores // 2 if attention == "sdpa" else 3 * scores) + scoring


def flop_counter(count_cpu_sdpa: bool = True) -> FlopCounterMode:
    """A silent FlopCounterMode whose CPU SDPA entries are :data:`CPU_SDPA_FLOP_FORMULAS` on every torch version.

    ``count_cpu_sdpa=False`` maps those kernels to 0 FLOPs, reproducing older torch counters (diagnostics).
    """
    mapping = CPU_SDPA_FLOP_FORMULAS if count_cpu_sdpa else {op: _zero_flops for op in CPU_SDPA_FLOP_FORMULAS}
    return FlopCounterMode(display=False, custom_mapping=dict(mapping))


def _zero_flops(*args: Any, **kwargs: Any) -> int:
    """A FLOP formula that counts nothing."""
    return 0


def measured_flops(fn: Callable[[], Any], backward: bool = False, count_cpu_sdpa: bool = True) -> int:
    """FLOPs FlopCounterMode counts while running ``fn()`` (and ``.backward()`` on its scalar result if ``backward``).

    Counts matmuls, convolutions and attention kernels only, like the analytic model; CPU SDPA included unless
    ``count_cpu_sdpa`` is False.
    """
    counter = flop_counter(count_cpu_sdpa)
    with counter:
        out = fn()
        if backward:
            if not (isinstance(out, torch.Tensor) and out.numel() == 1):
                raise ValueError("backward=True needs fn() to return a scalar tensor")
            out.backward()
    return counter.get_total_flops()
