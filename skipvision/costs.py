"""The one token-count model behind every analytic cost (docs/method.md "Costs"): a per-layer token schedule.

A :class:`TokenSchedule` says, for one prompt, how many tokens are present in each decoder layer (queries and keys
alike), how many of them run the FFN there, and how many positions stay in the KV cache after prefill. Prefill,
training-step and decode-step FLOPs follow from it with the per-term formulas of :mod:`skipvision.flops`, so
``python -m skipvision flops`` (skipvision/paper.py) and the benchmark's ideals (skipvision/bench/runner.py) count
the same way. What each method computes:

* full model: every token present and running the FFN in every layer; all of them stay cached;
* Skip-Vision: N_r + N_s + 2 slots per image, the N_s skipped ones without FFN in the Skip-FFN layers (every layer
  unless ``model.skip.layers`` restricts them); the N_s positions leave the cache after prefill;
* ``merge_only``: the full model over N_r + N_s merged slots per image (the merge happens before the LLM);
* FastV: every token in layers < K; from layer K on, the ``floor(ratio * image slots)`` dropped image tokens are
  gone, and the cache keeps only the survivors. FastV is training-free: its training step is the full model's.
* PyramidDrop: FastV's count at every stage boundary, each on the image tokens the previous stages left, in
  training and at prefill.

The schedule is per layer so that staged methods (tokens dropped at several layer boundaries) and per-layer routers
(a different token subset per layer) fit the same model. FLOPs are additive over samples: sum per-prompt schedules.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from skipvision.flops import LLMShape, analytic_forward_breakdown, train_step_from_forward
from skipvision.skip.policies.base import DropStage

if TYPE_CHECKING:
    from skipvision.model import VisionLanguageModel


@dataclass(frozen=True)
class LayerTokens:
    """One decoder layer of one prompt: ``present`` tokens (queries = keys), ``ffn`` of them running the FFN."""

    present: int
    ffn: int

    def __post_init__(self) -> None:
        if not 0 <= self.ffn <= self.present:
            raise ValueError(f"need 0 <= ffn <= present, got {self}")


@dataclass(frozen=True)
class TokenSchedule:
    """One prompt through the decoder: its :class:`LayerTokens`, first layer first, and the ``cached`` positions
    every layer's KV cache keeps after prefill (the same in every layer for all methods so far)."""

    layers: tuple[LayerTokens, ...]
    cached: int

    def __post_init__(self) -> None:
        if not self.layers:
            raise ValueError("a token schedule needs at least one layer")
        if not 0 <= self.cached <= max(layer.present for layer in self.layers):
            raise ValueError(f"cached={self.cached} must lie in 0..the most tokens present in a layer")

    @classmethod
    def full(cls, num_layers: int, text: int, visual: int, images: int = 1) -> TokenSchedule:
        """The full model (and ``merge_only``, with ``visual`` the merged count): ``text`` tokens and ``images`` x
        ``visual`` slots, all present and running the FFN in every layer, all cached."""
        tokens = text + visual * images
        return cls((LayerTokens(tokens, tokens),) * num_layers, tokens)

    @classmethod
    def skip_vision(
        cls,
        num_layers: int,
        text: int,
        retained: int,
        skipped: int,
        summaries: int = 2,
        images: int = 1,
        ffn_layers: Collection[int] | None = None,
    ) -> TokenSchedule:
        """Skip-Vision: ``text`` tokens and ``images`` x (N_r + N_s + summaries) slots, all present; the N_s
        ``skipped`` slots of each image run no FFN in ``ffn_layers`` (Skip-FFN layer indices in 0..L-1; None: every
        layer) and leave the cache after prefill."""
        tokens = text + (retained + skipped + summaries) * images
        skipped_tokens = skipped * images
        hooked = range(num_layers) if ffn_layers is None else ffn_layers
        layers = tuple(LayerTokens(tokens, tokens - (skipped_tokens if i in hooked else 0)) for i in range(num_layers))
        return cls(layers, tokens - skipped_tokens)

    @classmethod
    def dropped(
        cls, num_layers: int, text: int, visual: int, stages: Sequence[DropStage], images: int = 1
    ) -> TokenSchedule:
        """In-LLM drops (FastV, PyramidDrop): ``text`` tokens and ``images`` x ``visual`` slots in layers < K_1;
        at each stage's layer K_i, ``floor(ratio * image tokens still present)`` fewer (skipvision/skip/dropping.py's
        count, composed stage after stage). The cache keeps the final survivors."""
        tokens, candidates, start, layers = text + visual * images, visual * images, 0, []
        for stage in stages:
            if not start < stage.layer < num_layers:
                raise ValueError(
                    f"token dropping: stage layers (K) must increase within [1, {num_layers - 1}], got {stage.layer}"
                )
            layers += [LayerTokens(tokens, tokens)] * (stage.layer - start)
            dropped = math.floor(candidates * stage.ratio)
            tokens, candidates, start = tokens - dropped, candidates - dropped, stage.layer
        layers += [LayerTokens(tokens, tokens)] * (num_layers - start)
        return cls(tuple(layers), tokens)

    @classmethod
    def fastv(cls, num_layers: int, text: int, visual: int, layer: int, ratio: float, images: int = 1) -> TokenSchedule:
        """FastV at prefill: :meth:`dropped` with its one stage at ``layer`` (K)."""
        if not 1 <= layer < num_layers:
            raise ValueError(f"fastv: layer (K) must be in [1, {num_layers - 1}], got {layer}")
        return cls.dropped(num_layers, text, visual, [DropStage(layer, ratio)], images)


def model_schedule(model: VisionLanguageModel, text: int, images: int = 1, training: bool = False) -> TokenSchedule:
    """The schedule of a built model for a prompt of ``text`` tokens and ``images`` images (``training``: of a
    training step rather than a prefill).

    This is the one place that reads a method's settings off the model (``model.visual``'s ``skips`` and slot
    counts, which hold ``merge_only``'s merged count; the policy's ``drop_stages``; the Skip-FFN layers): the method
    interface will replace it by each method producing its own schedule.
    """
    num_layers = LLMShape.from_config(model.backbone.config).layers
    visual = model.visual
    if visual.skips:
        summaries = visual.num_slots - visual.num_retained - visual.num_skipped
        return TokenSchedule.skip_vision(
            num_layers, text, visual.num_retained, visual.num_skipped, summaries, images, model.skip_ffn.layers
        )
    stages = model.drop_stages(training)
    if stages:
        return TokenSchedule.dropped(num_layers, text, visual.num_slots, stages, images)
    return TokenSchedule.full(num_layers, text, visual.num_slots, images)  # the full model, merge_only, FastV training


def counts_schedule(
    num_layers: int, text: int, visual: int, retained: int, skipped: int, summaries: int = 2
) -> TokenSchedule:
    """Skip-Vision's schedule from plain counts, for a setting with no model to build (the paper's Chain-of-Sight):
    one image of ``visual`` (N) tokens, N_r ``retained``, the other N - N_r merged to ``skipped`` (N_s)."""
    if not 1 <= retained < visual or not 1 <= skipped <= visual - retained:
        raise ValueError(
            f"inconsistent token counts N={visual}, N_r={retained}, N_s={skipped}: need 1 <= N_r < N and "
            "1 <= N_s <= N - N_r"
        )
    return TokenSchedule.skip_vision(num_layers, text, retained, skipped, summaries)


def forward_breakdown(
    shape: LLMShape, schedule: TokenSchedule, logits_tokens: int, batch: int = 1, causal: bool = False
) -> dict[str, int]:
    """Forward matmul FLOPs by term (:func:`~skipvision.flops.analytic_forward_breakdown`'s keys) of ``batch``
    prompts following ``schedule``, layer by layer; ``logits_tokens`` of the last layer's tokens get logits.
    ``causal`` as in :func:`~skipvision.flops.analytic_forward_breakdown`."""
    if len(schedule.layers) != shape.layers:
        raise ValueError(f"the schedule has {len(schedule.layers)} layers, the LLM {shape.layers}")
    runs = [(layer, len(list(group))) for layer, group in itertools.groupby(schedule.layers)]  # equal neighbours
    terms = dict.fromkeys(("attn_proj", "attn_scores", "ffn", "lm_head"), 0)
    for i, (layer, count) in enumerate(runs):
        logits = logits_tokens if i == len(runs) - 1 else 0  # the LM head follows the last layer
        part = analytic_forward_breakdown(replace(shape, layers=count), layer.present, layer.ffn, batch, logits, causal)
        terms = {k: terms[k] + part[k] for k in terms}
    return terms


def prefill_flops(shape: LLMShape, schedule: TokenSchedule, causal: bool = False) -> int:
    """LLM forward FLOPs of one prompt's prefill, logits for the last token only."""
    return sum(forward_breakdown(shape, schedule, 1, causal=causal).values())


def train_step_flops(shape: LLMShape, schedule: TokenSchedule, batch: int = 1) -> int:
    """LLM forward + backward FLOPs of a training step on ``batch`` sequences following ``schedule`` (logits at
    every token, trainable weights, fused SDPA: :func:`~skipvision.flops.analytic_train_step_flops`'s rule)."""
    logits = schedule.layers[-1].present
    return train_step_from_forward(forward_breakdown(shape, schedule, logits, batch))


def decode_step_flops(shape: LLMShape, schedule: TokenSchedule) -> int:
    """LLM FLOPs of one decode step after ``schedule``'s prefill: one new token, FFN and logits included, whose
    query meets the ``cached`` keys and its own."""
    terms = analytic_forward_breakdown(shape, 1)  # a 1-token sequence: one (query, key) pair per head and layer
    terms["attn_scores"] *= schedule.cached + 1
    return sum(terms.values())
