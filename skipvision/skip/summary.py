"""Summary tokens s_R = pool(R) and s_S = pool(S) (docs/method.md "Token pipeline", step 5).

One scorer ``LayerNorm(D) -> Linear(D, 1)`` rates every token of a group; the summary is the softmax-weighted sum of
the group's projected (unnormalised) features. The same instance pools the retained group R and the merged skipped
group S, so both summaries share weights. It is newly initialised (PyTorch's default LayerNorm/Linear init) and
trained in SFT. After insertion the summaries are ordinary tokens in the LLM sequence.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class SummaryPooling(nn.Module):
    """Attention pooling of a token group into one summary token with a shared learned scorer."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.score = nn.Linear(dim, 1)

    def weights(self, group: Tensor, mask: Tensor | None = None) -> Tensor:
        """Pooling weights [B, n] of ``group`` [B, n, D]; ``mask`` [B, n] bool marks real tokens (True).

        Masked tokens get weight 0 and each row sums to 1, except an all-masked row, which is all zeros (no NaN).
        """
        scores = self.score(self.norm(group)).squeeze(-1).float()  # [B, n]
        if mask is None:
            return scores.softmax(dim=-1)
        # -inf only in rows with a real token, so no row is all -inf; all-masked rows are zeroed after the softmax.
        scores = scores.masked_fill(~mask & mask.any(dim=-1, keepdim=True), float("-inf"))
        return scores.softmax(dim=-1) * mask  # [B, n]

    def forward(self, group: Tensor, mask: Tensor | None = None) -> Tensor:
        """Summary token [B, D] of ``group`` [B, n, D] (optionally masked by ``mask`` [B, n], True = real token)."""
        weights = self.weights(group, mask).to(group.dtype)  # [B, n]
        return torch.einsum("bn,bnd->bd", weights, group)  # [B, D]
