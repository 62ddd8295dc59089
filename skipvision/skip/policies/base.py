"""The skip-policy interface: split an image's N visual tokens into retained R and skip candidates C.

docs/method.md "Token pipeline": after the projector, a skip policy picks N_r retained tokens R (full compute in the
LLM); the other N - N_r are skip candidates C (merged, then skipped by the FFN). Both groups keep raster order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


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


@dataclass(frozen=True)
class DropStage:
    """One in-LLM drop: decoder ``layer`` K is the first without the dropped tokens; there the ``ratio`` share of
    each row's current image tokens (``floor(ratio * candidates)``) that the scoring token attends to least in
    layer K - 1 leaves the sequence (FastV's rule, :func:`skipvision.skip.dropping.lowest_scored`)."""

    layer: int
    ratio: float


class SkipPolicy(nn.Module):
    """Chooses which visual tokens are retained (docs/method.md "Policies").

    Exactly one of ``num_retained`` (N_r, fixed) or ``retain_ratio`` (N_r = round(N * ratio), at least 1) sets the
    size of R, so every image of a batch gets the same N_r. Subclasses implement ``select``.
    ``uses_cls_scores`` tells the caller whether to ask the encoder for [CLS] attention scores at all.
    ``skips`` is False for the policies of the full-compute peers (docs/method.md "Peers"): nothing is skipped or
    summarised, every slot runs the FFN. The peers change the visual tokens in other ways: ``merge_to``
    (compression-only) is the number of tokens each image is merged into before the LLM, None for every other
    policy; :meth:`drop_stages` (FastV, PyramidDrop) are the image-token drops inside the LLM, which the model's
    forward, the prefill and the cost model all read (skipvision/skip/dropping.py).
    """

    uses_cls_scores: bool = False
    skips: bool = True  # False for the full-compute peers (nothing skipped or summarised)
    merge_to: int | None = None  # compression-only: tokens per image after merging (N_r + N_s); None: no merge

    def __init__(self, num_retained: int | None = None, retain_ratio: float | None = None) -> None:
        super().__init__()
        if (num_retained is None) == (retain_ratio is None):
            raise ValueError(
                f"{type(self).__name__}: set exactly one of num_retained or retain_ratio "
                f"(got num_retained={num_retained}, retain_ratio={retain_ratio})"
            )
        if num_retained is not None and num_retained < 1:
            raise ValueError(f"{type(self).__name__}: num_retained must be >= 1, got {num_retained}")
        if retain_ratio is not None and not 0 < retain_ratio <= 1:
            raise ValueError(f"{type(self).__name__}: retain_ratio must be in (0, 1], got {retain_ratio}")
        self.num_retained = num_retained
        self.retain_ratio = retain_ratio

    def num_retained_for(self, num_tokens: int) -> int:
        """N_r for an image of ``num_tokens`` visual tokens."""
        if self.num_retained is None:
            return max(1, round(num_tokens * self.retain_ratio))
        if self.num_retained > num_tokens:
            raise ValueError(
                f"{type(self).__name__}: num_retained={self.num_retained} exceeds the {num_tokens} visual tokens "
                "of an image; lower num_retained or use retain_ratio"
            )
        return self.num_retained

    def split(self, features: torch.Tensor, cls_scores: torch.Tensor | None = None) -> TokenSplit:
        """Split ``features`` [B, N, D] (projected visual tokens) given the encoder's [CLS] scores [B, N] or None."""
        if cls_scores is not None and cls_scores.shape != features.shape[:2]:
            raise ValueError(f"cls_scores {tuple(cls_scores.shape)} do not match features {tuple(features.shape)}")
        return self.select(features, cls_scores, self.num_retained_for(features.shape[1]))

    def select(self, features: torch.Tensor, cls_scores: torch.Tensor | None, num_retained: int) -> TokenSplit:
        """Pick ``num_retained`` tokens of ``features`` [B, N, D]; the sizes are already validated."""
        raise NotImplementedError

    def drop_stages(self, num_layers: int, training: bool) -> tuple[DropStage, ...]:
        """The drops inside a ``num_layers``-layer LLM, in a training step (``training``) or at inference: layers
        strictly increasing in [1, num_layers - 1]. None by default."""
        return ()

    def weight_retained(self, features: torch.Tensor, split: TokenSplit) -> torch.Tensor:
        """Hook for learned policies to put a gradient path through their scores; identity by default."""
        return features
