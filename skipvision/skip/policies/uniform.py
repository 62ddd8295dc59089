"""Evenly spread retained tokens: a content-free baseline for the selection rule (docs/method.md "Policies")."""

from __future__ import annotations

import torch

from skipvision.registry import SKIP_POLICIES
from skipvision.skip.policies.base import SkipPolicy, TokenSplit


@SKIP_POLICIES.register("uniform", tiny={"num_retained": 2})
class UniformPolicy(SkipPolicy):
    """Retains the raster positions ``round(linspace(0, N - 1, N_r))``: deterministic, the same for every image.

    The step (N - 1) / (N_r - 1) is at least 1, so the rounded positions are distinct.
    """

    def select(self, features: torch.Tensor, cls_scores: torch.Tensor | None, num_retained: int) -> TokenSplit:
        batch, num_tokens = features.shape[:2]
        spots = torch.linspace(0, num_tokens - 1, num_retained, dtype=torch.float64).round().long().unique()  # [N_r]
        return TokenSplit.from_indices(spots.to(features.device).expand(batch, -1), num_tokens)
