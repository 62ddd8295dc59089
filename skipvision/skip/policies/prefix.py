"""Retain the first N_r tokens: with thumbnail + tiles views, the thumbnail (the paper's LLaVA-HD setting).

docs/method.md "Policies": in the paper's LLaVA-HD setting the thumbnail's tokens are retained and the high-resolution
tiles' tokens are merged and skipped. The thumbnail's tokens come first in the visual sequence
(skipvision/data/views.py).
"""

from __future__ import annotations

import torch

from skipvision.registry import SKIP_POLICIES
from skipvision.skip.policies.base import SkipPolicy, TokenSplit


@SKIP_POLICIES.register("prefix", tiny={"num_retained": 2})
class PrefixPolicy(SkipPolicy):
    """Retains tokens 0..N_r-1; the rest are skip candidates."""

    def select(self, features: torch.Tensor, cls_scores: torch.Tensor | None, num_retained: int) -> TokenSplit:
        batch, num_tokens = features.shape[:2]
        order = torch.arange(num_tokens, device=features.device).expand(batch, -1)  # [B, N]
        return TokenSplit(order[:, :num_retained], order[:, num_retained:])
