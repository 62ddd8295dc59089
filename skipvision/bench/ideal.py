"""The analytic (ideal) cost of each variant, from its token plan and the LLM's shape (docs/method.md "Costs").

Matmul FLOPs as in :mod:`skipvision.flops`. What each variant computes:

* ``none`` (full model): every token of the sequence, FFN included, in every layer;
* Skip-Vision: the same layers on the shorter sequence (N_r + N_s + 2 slots per image), FFN off on the N_s slots;
* ``merge_only``: the shorter sequence, FFN on every token;
* ``fastv``: the full sequence in layers < K, the sequence without its dropped image tokens in layers >= K
  (training is the full model's: FastV is training-free).

The encoder's FLOPs are measured once (they are the same in every variant) and added to both sides. Time ideals are
FLOP ideals: an implementation whose time ratio equals its FLOP ratio reaches achieved/ideal = 1.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from skipvision.flops import LLMShape, analytic_forward_breakdown, analytic_train_step_flops
from skipvision.model import VisionLanguageModel


@dataclass
class TokenCounts:
    """One prompt of the variant: sequence length, tokens without FFN, tokens FastV drops from layer K on."""

    seq: int
    skipped: int = 0
    fastv_dropped: int = 0
    fastv_layer: int | None = None


def token_counts(model: VisionLanguageModel, prompt_tokens: int, images: int = 1) -> TokenCounts:
    """Counts for a prompt of ``prompt_tokens`` (image slots included) holding ``images`` images."""
    visual, policy = model.visual, model.visual.policy
    skipped = visual.num_skipped * images if visual.skips else 0
    if policy.prunes_in_llm:
        dropped = int(policy.ratio * visual.num_slots * images)  # floor, as fastv_prefill drops
        return TokenCounts(prompt_tokens, 0, dropped, policy.layer)
    return TokenCounts(prompt_tokens, skipped)


def prefill_flops(shape: LLMShape, counts: TokenCounts) -> int:
    """LLM forward FLOPs of one prompt's prefill, logits for the last token only."""
    if counts.fastv_layer is None:
        terms = analytic_forward_breakdown(shape, counts.seq, counts.seq - counts.skipped, logits_tokens=1)
        return sum(terms.values())
    k = counts.fastv_layer
    low = analytic_forward_breakdown(replace(shape, layers=k), counts.seq, logits_tokens=0)
    high = analytic_forward_breakdown(replace(shape, layers=shape.layers - k), counts.seq - counts.fastv_dropped)
    high["lm_head"] = 2 * shape.hidden * shape.vocab  # the last token's logits only
    return sum(low.values()) + sum(high.values())


def train_step_flops(shape: LLMShape, counts: TokenCounts, batch: int) -> int:
    """LLM forward + backward FLOPs of a training step of ``batch`` sequences of ``counts.seq`` tokens (sdpa)."""
    return analytic_train_step_flops(shape, counts.seq, counts.seq - counts.skipped, batch=batch)


def decode_token_flops(shape: LLMShape, cache_positions: int) -> int:
    """LLM FLOPs of one decode step of one sequence attending over ``cache_positions`` cached keys (+ itself)."""
    terms = analytic_forward_breakdown(shape, 1)
    keys = cache_positions + 1
    terms["attn_scores"] = shape.layers * 2 * 2 * shape.head_dim * shape.heads * keys
    return sum(terms.values())


def kept_positions(counts: TokenCounts, drop_kv: bool = True) -> int:
    """Cache positions one prompt leaves after prefill (and removal)."""
    if counts.fastv_layer is not None:
        return counts.seq - counts.fastv_dropped
    return counts.seq - (counts.skipped if drop_kv else 0)
