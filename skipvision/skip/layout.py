"""What a token-skipping method decides (docs/methods.md "The method interface"): where one image's tokens sit in
the LLM sequence and what each slot does there (:class:`SlotLayout`), and which image tokens leave the sequence at
which decoder layer (:class:`DropStage`).

Every method fills each ``<image>`` placeholder with K slots laid out as ``[R][s_R][S][s_S]``: ``retained`` slots
that run the whole layer, one summary after them, ``skipped`` slots S that take part in attention but skip the FFN
(and leave the KV cache after prefill), one summary after them. The full model, compression-only and the in-LLM
droppers and routers (FastV, PyramidDrop, mod_router) are the layout with only R: ``SlotLayout(K)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class VisualTokens:
    """A method's visual output for M images: ``tokens`` [M, K, D] in the layout's slot order."""

    tokens: torch.Tensor  # [M, K, D]
    ffn: torch.Tensor  # [K] bool, False at the skipped (S) slots
    aux_loss: torch.Tensor | None = None  # scalar, a learned method's auxiliary loss


@dataclass(frozen=True)
class DropStage:
    """One in-LLM drop: decoder ``layer`` K is the first without the dropped tokens; there the ``ratio`` share of
    each row's current droppable image tokens (``floor(ratio * candidates)``) that the scoring token attends to least
    in layer K - 1 leaves the sequence (FastV's rule, :func:`skipvision.skip.dropping.lowest_scored`)."""

    layer: int
    ratio: float


@dataclass(frozen=True)
class SlotLayout:
    """One image's slots: ``retained`` (R), then ``summaries`` (0 or 2) interleaved as ``[R][s_R][S][s_S]``, and
    ``skipped`` (S, no FFN). With ``summaries`` 0 the layout is ``[R][S]``."""

    retained: int
    skipped: int = 0
    summaries: int = 0

    def __post_init__(self) -> None:
        if self.retained < 1 or self.skipped < 0 or self.summaries not in (0, 2):
            raise ValueError(f"a slot layout needs retained >= 1, skipped >= 0 and 0 or 2 summaries, got {self}")
        if self.summaries and not self.skipped:
            raise ValueError(f"summary tokens pool R and S: a layout with summaries needs skipped slots, got {self}")

    @property
    def slots(self) -> int:
        """K: slots one image fills."""
        return self.retained + self.skipped + self.summaries

    @property
    def skips(self) -> bool:
        """Whether some slots skip the FFN (Skip-Vision), i.e. the model needs Skip-FFN and KV removal."""
        return self.skipped > 0

    @property
    def droppable(self) -> int:
        """Slots per image an in-LLM drop may remove: the skipped ones S when there are any (their FFN is off
        already, so the FFN count is unchanged by a drop), else every slot."""
        return self.skipped if self.skips else self.slots

    def ffn(self, device: torch.device | None = None) -> torch.Tensor:
        """[K] bool: which slots run the FFN (all but S)."""
        mask = torch.ones(self.slots, dtype=torch.bool, device=device)
        start = self.retained + self.summaries // 2
        mask[start : start + self.skipped] = False
        return mask

    def drop_candidates(self, device: torch.device | None = None) -> torch.Tensor:
        """[K] bool: the slots an in-LLM drop may remove (see :attr:`droppable`)."""
        ffn = self.ffn(device)
        return ~ffn if self.skips else ffn
