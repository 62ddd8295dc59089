"""The method interface (docs/methods.md "The method interface"), and Skip-Vision's split as its base case.

docs/method.md "Token pipeline": after the projector, a skip policy picks N_r retained tokens R (full compute in the
LLM); the other N - N_r are skip candidates C (merged, then skipped by the FFN). Both groups keep raster order. The
other methods (the full model, compression-only, FastV, PyramidDrop, mod_router) override the interface's steps.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.profiler import record_function

from skipvision.costs import TokenSchedule
from skipvision.errors import MethodError
from skipvision.skip.layout import DropStage, SlotLayout, VisualTokens

if TYPE_CHECKING:
    from skipvision.inference.kv import Removal
    from skipvision.skip.ffn import SkipFFN

__all__ = ["DropSchedule", "DropStage", "NeedsClsAttention", "SkipPolicy", "TokenSplit", "drop_schedule"]


@dataclass
class TokenSplit:
    """Per-image token indices into the N visual tokens; every row of both is sorted ascending (raster order)."""

    retained: torch.Tensor  # [B, N_r] long
    candidates: torch.Tensor  # [B, N - N_r] long
    aux_loss: torch.Tensor | None = None  # scalar, a learned policy's auxiliary loss
    scores: torch.Tensor | None = None  # [B, N], the scores the selection was made by

    @classmethod
    def from_mask(
        cls, keep: torch.Tensor, aux_loss: torch.Tensor | None = None, scores: torch.Tensor | None = None
    ) -> TokenSplit:
        """From a keep-mask [B, N] bool with the same number of True entries in every row."""
        counts = keep.sum(dim=1)  # [B]
        if not bool((counts == counts[0]).all()):
            raise ValueError(f"A keep-mask must retain the same number of tokens in every row, got {counts.tolist()}")
        num_retained = int(counts[0])
        order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)  # [B, N]: kept first, each part ascending
        return cls(order[:, :num_retained], order[:, num_retained:], aux_loss, scores)

    @classmethod
    def from_indices(
        cls,
        indices: torch.Tensor,
        num_tokens: int,
        aux_loss: torch.Tensor | None = None,
        scores: torch.Tensor | None = None,
    ) -> TokenSplit:
        """From retained indices [B, N_r] in any order (e.g. top-k), distinct within a row, out of ``num_tokens``."""
        keep = torch.zeros(indices.shape[0], num_tokens, dtype=torch.bool, device=indices.device)  # [B, N]
        return cls.from_mask(keep.scatter(1, indices, True), aux_loss, scores)


class SkipPolicy(nn.Module):
    """A token-skipping method (docs/methods.md "The method interface"): everything it decides is one of these
    methods, which the model, ``generate``, the cost model and the bench call; none reads a flag off it.

    * :meth:`layout` -- K slots per image and their roles (:class:`~skipvision.skip.layout.SlotLayout`);
    * :meth:`tokens` -- the M images' projected tokens [M, N, D] -> the slot tokens [M, K, D];
    * :meth:`drop_stages` -- image tokens that leave the sequence at decoder-layer boundaries;
    * :meth:`routed_layers`, :meth:`attach` and :meth:`route` -- per-layer FFN rows chosen inside the LLM (a
      router);
    * :meth:`schedule` -- the per-layer token counts all of the above give, for FLOPs (skipvision/costs.py).

    This base class is Skip-Vision's split (docs/method.md "Token pipeline"): exactly one of ``num_retained`` (N_r,
    fixed) or ``retain_ratio`` (N_r = round(N * ratio), at least 1) sets the size of R, so every image of a batch gets
    the same N_r; subclasses implement :meth:`select`. The candidates C are merged to N_s tokens by the recipe's
    compressor and skip the FFN, with two summary tokens. ``drop`` (``{layers: [K, ...], ratio: r}``) composes a
    PyramidDrop-style schedule on top: at each layer K the ``r`` share of the remaining S tokens that the last
    instruction token attends to least leaves the sequence, in training and at inference.
    """

    def __init__(
        self,
        num_retained: int | None = None,
        retain_ratio: float | None = None,
        drop: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if (num_retained is None) == (retain_ratio is None):
            raise MethodError(
                f"{type(self).__name__}: set exactly one of num_retained or retain_ratio "
                f"(got num_retained={num_retained}, retain_ratio={retain_ratio})"
            )
        if num_retained is not None and num_retained < 1:
            raise MethodError(f"{type(self).__name__}: num_retained must be >= 1, got {num_retained}")
        if retain_ratio is not None and not 0 < retain_ratio <= 1:
            raise MethodError(f"{type(self).__name__}: retain_ratio must be in (0, 1], got {retain_ratio}")
        self.num_retained = num_retained
        self.retain_ratio = retain_ratio
        self.drop = None if drop is None else drop_schedule(type(self).__name__, **drop)

    def num_retained_for(self, num_tokens: int) -> int:
        """N_r for an image of ``num_tokens`` visual tokens."""
        if self.num_retained is None:
            return max(1, round(num_tokens * self.retain_ratio))
        if self.num_retained > num_tokens:
            raise MethodError(
                f"{type(self).__name__}: num_retained={self.num_retained} exceeds the {num_tokens} visual tokens "
                "of an image; lower num_retained or use retain_ratio"
            )
        return self.num_retained

    def layout(self, num_tokens: int, num_skipped: int | None, summary_tokens: bool) -> SlotLayout:
        """The slots of an image of ``num_tokens`` (N) tokens: N_r retained, the N - N_r candidates merged to
        ``num_skipped`` (N_s; None: no merge) skipped ones, and two summaries unless ``summary_tokens`` is off."""
        retained = self.num_retained_for(num_tokens)
        candidates = num_tokens - retained
        skipped = candidates if num_skipped is None else num_skipped
        if not 1 <= skipped <= candidates:
            raise MethodError(
                f"num_skipped (N_s) must be between 1 and the {candidates} skip candidates "
                f"(N={num_tokens}, N_r={retained}); got {skipped}"
            )
        return SlotLayout(retained, skipped, 2 if summary_tokens else 0)

    def tokens(
        self,
        features: torch.Tensor,
        cls_scores: torch.Tensor | None,
        layout: SlotLayout,
        compressor: nn.Module,
        summary: nn.Module | None,
    ) -> VisualTokens:
        """``features`` [M, N, D] (with the encoder's [CLS] scores [M, N] or None) -> ``[R][s_R][S][s_S]`` [M, K, D]:
        split, merge C to S with ``compressor``, pool the summaries with ``summary`` (None: no summaries)."""
        with record_function("skipvision::policy_split"):
            split = self.split(features, cls_scores)
            features = self.weight_retained(features, split)  # [M, N, D]
            dim = features.shape[-1]
            kept = features.gather(1, split.retained[..., None].expand(-1, -1, dim))  # [M, N_r, D]
            cands = features.gather(1, split.candidates[..., None].expand(-1, -1, dim))  # [M, N - N_r, D]
        with record_function("skipvision::merge"):
            merged = compressor(cands, layout.skipped)  # [M, N_s, D]
        with record_function("skipvision::summaries"):
            if summary is None:
                parts = [kept, merged]
            else:
                parts = [kept, summary(kept)[:, None], merged, summary(merged)[:, None]]
            tokens = torch.cat(parts, dim=1)  # [M, K, D]
        return VisualTokens(tokens, layout.ffn(features.device), split.aux_loss)

    def split(self, features: torch.Tensor, cls_scores: torch.Tensor | None = None) -> TokenSplit:
        """Split ``features`` [B, N, D] (projected visual tokens) given the encoder's [CLS] scores [B, N] or None."""
        if cls_scores is not None and cls_scores.shape != features.shape[:2]:
            raise ValueError(f"cls_scores {tuple(cls_scores.shape)} do not match features {tuple(features.shape)}")
        return self.select(features, cls_scores, self.num_retained_for(features.shape[1]))

    def select(self, features: torch.Tensor, cls_scores: torch.Tensor | None, num_retained: int) -> TokenSplit:
        """Pick ``num_retained`` tokens of ``features`` [B, N, D]; the sizes are already validated."""
        raise NotImplementedError

    def weight_retained(self, features: torch.Tensor, split: TokenSplit) -> torch.Tensor:
        """Hook for learned policies to put a gradient path through their scores; identity by default."""
        return features

    def drop_stages(self, num_layers: int, training: bool) -> tuple[DropStage, ...]:
        """The drops inside a ``num_layers``-layer LLM, in a training step (``training``) or at inference: layers
        strictly increasing in [1, num_layers - 1], each dropping among the layout's droppable slots. The ``drop``
        schedule, the same in training and inference; none by default."""
        return () if self.drop is None else self.drop.stages(num_layers)

    def routed_layers(self, num_layers: int) -> tuple[int, ...]:
        """Decoder layers whose FFN rows the method chooses inside the LLM (:meth:`attach`); none by default."""
        return ()

    def attach(self, backbone: nn.Module, skip_ffn: SkipFFN) -> None:
        """Install, once, when the model is built, the hooks by which forwards of ``backbone`` choose the FFN rows of
        the :meth:`routed_layers` through ``skip_ffn`` (attached to them). They stay for the model's life, like
        Skip-FFN's MLP overrides, so gradient checkpointing's recomputation runs them again. Nothing by default."""

    def llm_modules(self) -> list[nn.Module]:
        """The method's modules that its hooks call inside the LLM (a router per layer). FSDP shards each as its own
        unit, so it is gathered when called from a decoder layer's hook, after the visual stage has resharded. None
        by default."""
        return []

    def route(
        self,
        visual_slots: torch.Tensor | None,
        attention_mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> None:
        """Set the image slots ``visual_slots`` [B, T] bool of the coming forwards over a whole sequence, with their
        2-D ``attention_mask`` and true ``positions`` [B, T] (None: the forwards run unrouted). They stay until the
        next call, like a Skip-FFN plan (recomputation routes the same rows). Nothing by default."""

    def layer_columns(self) -> list[Removal] | None:
        """After a routed prefill, the prompt positions each decoder layer's cache holds, for a method whose layers
        ran on different rows (a whole-layer router); None when every layer holds them all (the default)."""
        return None

    def schedule(
        self,
        num_layers: int,
        text: int,
        layout: SlotLayout,
        images: int = 1,
        training: bool = False,
        ffn_layers: Collection[int] | None = None,
    ) -> TokenSchedule:
        """Per-layer token counts of a prompt of ``text`` tokens and ``images`` images in a training step
        (``training``) or a prefill: the layout's slots, Skip-FFN in ``ffn_layers`` (None: every layer) and the
        :meth:`drop_stages`. A method that chooses tokens another way overrides it."""
        stages = self.drop_stages(num_layers, training)
        return TokenSchedule.of_layout(num_layers, text, layout, images, stages, ffn_layers)


class NeedsClsAttention:
    """Mixin type for methods that read the encoder's [CLS] attention (the model then asks the encoder for it)."""


@dataclass(frozen=True)
class DropSchedule:
    """``layers`` (strictly increasing, >= 1) dropping ``ratio`` of the droppable image tokens at each; None:
    PyramidDrop's 8/16/24 of 32 scaled to the LLM's depth (``round(L * k / 4)``, k = 1..3, within 1..L - 1)."""

    layers: tuple[int, ...] | None
    ratio: float

    def stages(self, num_layers: int) -> tuple[DropStage, ...]:
        """The stages for a ``num_layers``-layer LLM; a boundary >= ``num_layers`` raises where the stages run."""
        layers = self.layers
        if layers is None:
            layers = tuple(sorted({k for k in (round(num_layers * i / 4) for i in (1, 2, 3)) if 1 <= k < num_layers}))
        return tuple(DropStage(k, self.ratio) for k in layers)


def drop_schedule(owner: str, layers: Sequence[int] | None = None, ratio: float = 0.5) -> DropSchedule:
    """A validated :class:`DropSchedule`; ``owner`` names the method in errors."""
    if layers is not None:
        layers = tuple(int(k) for k in layers)
        if not layers or layers[0] < 1 or list(layers) != sorted(set(layers)):
            raise MethodError(f"{owner}: drop layers must be strictly increasing and >= 1, got {list(layers)}")
    if not 0 < ratio < 1:
        raise MethodError(
            f"{owner}: drop ratio (share of image tokens dropped per stage) must be in (0, 1), got {ratio}"
        )
    return DropSchedule(layers, ratio)
