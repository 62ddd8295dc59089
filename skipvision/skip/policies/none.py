"""The full model as a skip policy: every visual token is retained (docs/method.md "Peers")."""

from __future__ import annotations

import torch

from skipvision.registry import SKIP_POLICIES
from skipvision.skip.policies.base import SkipPolicy, TokenSplit


@SKIP_POLICIES.register("none", tiny={})
class NoSkip(SkipPolicy):
    """Retains all N tokens; the candidates are empty ([B, 0]), so nothing is merged or skipped."""

    skips = False

    def __init__(self) -> None:
        super().__init__(retain_ratio=1.0)

    def select(self, features: torch.Tensor, cls_scores: torch.Tensor | None, num_retained: int) -> TokenSplit:
        batch, num_tokens = features.shape[:2]
        every = torch.arange(num_tokens, device=features.device).expand(batch, -1)  # [B, N]
        return TokenSplit(every, every[:, :0])
