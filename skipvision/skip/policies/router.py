"""A learned router as a skip policy, mixture-of-depths style (docs/method.md "Policies"; beyond the paper).

A linear scorer on the projected features ranks the tokens; the top-N_r are retained. Top-k has no gradient, so
the scorer learns through two paths: ``weight_retained`` scales the tokens by a value-preserving straight-through
gate (the forward is unchanged, the task loss's gradient reaches the scores), and an auxiliary BCE loss teaches the
scores to be positive exactly on the selected tokens, so a threshold at 0 matches the top-k choice.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from skipvision.registry import SKIP_POLICIES
from skipvision.skip.policies.base import SkipPolicy, TokenSplit


@SKIP_POLICIES.register("router", tiny={"num_retained": 2})
class RouterPolicy(SkipPolicy):
    """Top-N_r tokens by a learned score ``Linear(D, 1)`` (after a LayerNorm when ``norm``) of the projected tokens.

    ``dim`` (D, the projected width) is wired by the framework. ``split`` returns the router logits [B, N] in
    ``TokenSplit.scores`` and ``aux_weight * BCEWithLogits(logits, selected)`` in ``TokenSplit.aux_loss``; the
    caller adds the aux loss to the task loss and passes the visual tokens through ``weight_retained``.
    """

    def __init__(
        self,
        dim: int,
        num_retained: int | None = None,
        retain_ratio: float | None = None,
        norm: bool = True,
        aux_weight: float = 0.01,
        drop: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(num_retained, retain_ratio, drop)
        self.scorer = nn.Sequential(nn.LayerNorm(dim) if norm else nn.Identity(), nn.Linear(dim, 1))
        self.aux_weight = aux_weight

    def select(self, features: torch.Tensor, cls_scores: torch.Tensor | None, num_retained: int) -> TokenSplit:
        logits = self.scorer(features).squeeze(-1)  # [B, N]
        top = logits.detach().topk(num_retained, dim=1).indices  # [B, N_r]
        selected = torch.zeros_like(logits, dtype=torch.bool).scatter(1, top, True)  # [B, N]
        aux = self.aux_weight * F.binary_cross_entropy_with_logits(logits.float(), selected.float())
        return TokenSplit.from_mask(selected, aux_loss=aux, scores=logits)

    def weight_retained(self, features: torch.Tensor, split: TokenSplit) -> torch.Tensor:
        """``features`` [B, N, D] times ``1 + sigmoid(s) - sigmoid(s).detach()`` per token: equal to ``features``
        in value (exactly: the added term is zero), but the gradient reaches the router scores ``s = split.scores``.
        Every token is weighted, so candidates get the task's gradient too and can rise into the retained set."""
        gate = torch.sigmoid(split.scores).to(features.dtype)  # [B, N]
        return features + features * (gate - gate.detach()).unsqueeze(-1)  # [B, N, D]
