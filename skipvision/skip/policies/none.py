"""The full model as a skip policy: every visual token is retained (docs/method.md "Peers")."""

from __future__ import annotations

import torch
from torch import nn

from skipvision.registry import SKIP_POLICIES
from skipvision.skip.layout import SlotLayout, VisualTokens
from skipvision.skip.policies.base import SkipPolicy, TokenSplit


@SKIP_POLICIES.register("none", tiny={})
class NoSkip(SkipPolicy):
    """Retains all N tokens: the layout is the N tokens themselves, every one running the FFN, and :meth:`tokens`
    hands them on unchanged (no merge, no summaries). The base of the methods that change the tokens elsewhere
    (compression-only before the LLM; FastV, PyramidDrop and mod_router inside it)."""

    def __init__(self) -> None:
        super().__init__(retain_ratio=1.0)

    def layout(self, num_tokens: int, num_skipped: int | None, summary_tokens: bool) -> SlotLayout:
        """N full-compute slots (``num_skipped`` and ``summary_tokens`` have nothing to act on)."""
        return SlotLayout(num_tokens)

    def tokens(
        self,
        features: torch.Tensor,
        cls_scores: torch.Tensor | None,
        layout: SlotLayout,
        compressor: nn.Module,
        summary: nn.Module | None,
    ) -> VisualTokens:
        """``features`` [M, N, D] as they are."""
        return VisualTokens(features, layout.ffn(features.device))

    def select(self, features: torch.Tensor, cls_scores: torch.Tensor | None, num_retained: int) -> TokenSplit:
        batch, num_tokens = features.shape[:2]
        every = torch.arange(num_tokens, device=features.device).expand(batch, -1)  # [B, N]
        return TokenSplit(every, every[:, :0])
