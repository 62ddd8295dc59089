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
  training and at prefill;
* Skip-Vision with a ``drop`` schedule: the stages drop among the S slots, so the FFN count stays;
* mod_router: every token present and cached; in layer l, ``floor((1 - ratio_l) * image slots)`` skip the FFN;
  with ``mode: layer`` they are absent from layer l and from its cache instead.

The work a method spends choosing tokens is counted too (:class:`LayerTokens` ``routed`` and ``scored``), so the
in-LLM methods' measured prefill FLOPs equal their schedules'. Each method produces its own schedule
(:meth:`~skipvision.skip.policies.base.SkipPolicy.schedule`, docs/methods.md "Costs of a method").

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
from skipvision.skip.layout import DropStage, SlotLayout

if TYPE_CHECKING:
    from skipvision.model import VisionLanguageModel


@dataclass(frozen=True)
class LayerTokens:
    """One decoder layer of one prompt: ``present`` tokens (queries = keys), ``ffn`` of them running the FFN, and the
    work a method spends choosing tokens there: ``routed`` tokens of the layer's input scored by a ``Linear(D, 1)``
    router (mod_router; more than ``present`` when the layer then runs on the chosen ones only), ``scored`` tokens
    whose query and key projections feed one attention row at the layer's input (the scoring before a drop at the
    next layer; skipvision/skip/dropping.py's ``last_token_attention``)."""

    present: int
    ffn: int
    routed: int = 0
    scored: int = 0

    def __post_init__(self) -> None:
        for name in ("ffn", "scored"):
            if not 0 <= getattr(self, name) <= self.present:
                raise ValueError(f"need 0 <= {name} <= present, got {self}")
        if self.routed < 0:
            raise ValueError(f"need routed >= 0, got {self}")


@dataclass(frozen=True)
class TokenSchedule:
    """One prompt through the decoder: its :class:`LayerTokens`, first layer first, and the ``cached`` positions
    every layer's KV cache keeps after prefill; one count per layer when the layers keep different positions (a
    whole-layer router: each layer's cache holds the tokens it ran on)."""

    layers: tuple[LayerTokens, ...]
    cached: int | tuple[int, ...]
    length: int | None = None  # tokens of the input sequence, which the LM head sees in training; None: layer 0's

    def __post_init__(self) -> None:
        if not self.layers:
            raise ValueError("a token schedule needs at least one layer")
        if isinstance(self.cached, tuple) and len(self.cached) != len(self.layers):
            raise ValueError(f"cached has {len(self.cached)} per-layer counts for {len(self.layers)} layers")
        most = max(layer.present for layer in self.layers)
        if not all(0 <= c <= most for c in self.layer_cached):
            raise ValueError(f"cached={self.cached} must lie in 0..the most tokens present in a layer")

    @property
    def sequence(self) -> int:
        """The input sequence's tokens: what a training step's LM head runs on (in-LLM drops and whole-layer routing
        put every position back before the final norm)."""
        return self.layers[0].present if self.length is None else self.length

    @property
    def layer_cached(self) -> tuple[int, ...]:
        """The positions each layer's cache keeps after prefill."""
        return self.cached if isinstance(self.cached, tuple) else (self.cached,) * len(self.layers)

    @property
    def kv_positions(self) -> float:
        """Cached positions per layer, averaged over the layers (the KV cache's size in positions)."""
        return sum(self.layer_cached) / len(self.layers)

    @classmethod
    def of_layout(
        cls,
        num_layers: int,
        text: int,
        layout: SlotLayout,
        images: int = 1,
        stages: Sequence[DropStage] = (),
        ffn_layers: Collection[int] | None = None,
    ) -> TokenSchedule:
        """``text`` tokens and ``images`` images of ``layout``'s slots: the S slots run no FFN in ``ffn_layers``
        (Skip-FFN layer indices in 0..L-1; None: every layer); at each stage's layer K_i, ``floor(ratio *
        droppable tokens still present)`` fewer tokens (skipvision/skip/dropping.py's count, stage after stage, on
        the layout's droppable slots: S when there are any, else every image slot). The cache keeps the final
        survivors but S."""
        tokens = text + layout.slots * images
        skipped, droppable = layout.skipped * images, layout.droppable * images
        hooked = set(range(num_layers) if ffn_layers is None else ffn_layers)
        bounds = [stage.layer for stage in stages]
        for k, before in zip(bounds, [0, *bounds], strict=False):
            if not before < k < num_layers:
                raise ValueError(
                    f"token dropping: stage layers (K) must increase within [1, {num_layers - 1}], got {k}"
                )
        start, layers = 0, []
        for stage in (*stages, DropStage(num_layers, 0.0)):  # the last entry closes the final run of layers
            layers += [LayerTokens(tokens, tokens - (skipped if i in hooked else 0)) for i in range(start, stage.layer)]
            if stage.layer < num_layers:  # the row that ranks this stage's drop, on layer K - 1's input
                layers[-1] = replace(layers[-1], scored=tokens)
            dropped = math.floor(droppable * stage.ratio)
            tokens, droppable, start = tokens - dropped, droppable - dropped, stage.layer
            skipped -= dropped if layout.skips else 0
        return cls(tuple(layers), tokens - skipped)

    @classmethod
    def full(cls, num_layers: int, text: int, visual: int, images: int = 1) -> TokenSchedule:
        """The full model (and ``merge_only``, with ``visual`` the merged count): ``text`` tokens and ``images`` x
        ``visual`` slots, all present and running the FFN in every layer, all cached."""
        return cls.of_layout(num_layers, text, SlotLayout(visual), images)

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
        ``skipped`` slots of each image run no FFN in ``ffn_layers`` and leave the cache after prefill."""
        return cls.of_layout(num_layers, text, SlotLayout(retained, skipped, summaries), images, (), ffn_layers)

    @classmethod
    def dropped(
        cls, num_layers: int, text: int, visual: int, stages: Sequence[DropStage], images: int = 1
    ) -> TokenSchedule:
        """In-LLM drops (FastV, PyramidDrop) on ``images`` x ``visual`` full-compute slots (:meth:`of_layout`)."""
        return cls.of_layout(num_layers, text, SlotLayout(visual), images, stages)

    @classmethod
    def fastv(cls, num_layers: int, text: int, visual: int, layer: int, ratio: float, images: int = 1) -> TokenSchedule:
        """FastV at prefill: :meth:`dropped` with its one stage at ``layer`` (K)."""
        if not 1 <= layer < num_layers:
            raise ValueError(f"fastv: layer (K) must be in [1, {num_layers - 1}], got {layer}")
        return cls.dropped(num_layers, text, visual, [DropStage(layer, ratio)], images)


def model_schedule(model: VisionLanguageModel, text: int, images: int = 1, training: bool = False) -> TokenSchedule:
    """The schedule of a built model for a prompt of ``text`` tokens and ``images`` images (``training``: of a
    training step rather than a prefill): its method's own :meth:`~skipvision.skip.policies.base.SkipPolicy.schedule`
    on its slot layout and Skip-FFN layers."""
    num_layers = LLMShape.from_config(model.backbone.config).layers
    ffn_layers = None if model.skip_ffn is None else model.skip_ffn.layers
    return model.visual.policy.schedule(num_layers, text, model.visual.layout, images, training, ffn_layers)


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
    """Forward matmul FLOPs by term (:func:`~skipvision.flops.analytic_forward_breakdown`'s keys, plus
    ``routing``, the methods' routers, and ``scoring``, their scoring rows before drops) of ``batch`` prompts
    following ``schedule``, layer by layer; ``logits_tokens`` of the sequence's tokens get logits. ``causal`` as in
    :func:`~skipvision.flops.analytic_forward_breakdown`."""
    if len(schedule.layers) != shape.layers:
        raise ValueError(f"the schedule has {len(schedule.layers)} layers, the LLM {shape.layers}")
    if not 0 <= logits_tokens <= schedule.sequence:
        raise ValueError(f"logits_tokens must lie in 0..{schedule.sequence} (the sequence), got {logits_tokens}")
    runs = [(layer, len(list(group))) for layer, group in itertools.groupby(schedule.layers)]  # equal neighbours
    terms = dict.fromkeys(("attn_proj", "attn_scores", "ffn", "lm_head", "routing", "scoring"), 0)
    q_width, kv_width = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    for layer, count in runs:
        part = analytic_forward_breakdown(replace(shape, layers=count), layer.present, layer.ffn, batch, 0, causal)
        router = 2 * shape.hidden * layer.routed  # Linear(D, 1) on each routed token
        row = 2 * shape.hidden * (q_width + kv_width) * layer.scored + 2 * q_width * layer.scored  # projections, q.k
        part["routing"], part["scoring"] = batch * count * router, batch * count * row
        terms = {k: terms[k] + part[k] for k in terms}
    terms["lm_head"] = analytic_forward_breakdown(replace(shape, layers=0), logits_tokens, 0, batch)["lm_head"]
    return terms


def prefill_flops(shape: LLMShape, schedule: TokenSchedule, causal: bool = False) -> int:
    """LLM forward FLOPs of one prompt's prefill, logits for the last token only."""
    return sum(forward_breakdown(shape, schedule, 1, causal=causal).values())


def train_step_flops(shape: LLMShape, schedule: TokenSchedule, batch: int = 1) -> int:
    """LLM forward + backward FLOPs of a training step on ``batch`` sequences following ``schedule`` (logits at
    every token, trainable weights, fused SDPA: :func:`~skipvision.flops.analytic_train_step_flops`'s rule)."""
    return train_step_from_forward(forward_breakdown(shape, schedule, schedule.sequence, batch))


def decode_step_flops(shape: LLMShape, schedule: TokenSchedule) -> int:
    """LLM FLOPs of one decode step after ``schedule``'s prefill: one new token, FFN and logits included, whose
    query meets each layer's ``cached`` keys and its own."""
    terms = analytic_forward_breakdown(shape, 1)  # a 1-token sequence: one (query, key) pair per head and layer
    terms["attn_scores"] = terms["attn_scores"] // shape.layers * sum(c + 1 for c in schedule.layer_cached)
    return sum(terms.values())
