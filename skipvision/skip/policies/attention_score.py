"""The paper's selection rule: retain the top-N_r tokens by the encoder's [CLS] attention.

See docs/method.md "Policies".
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from skipvision.errors import MethodError
from skipvision.registry import SKIP_POLICIES
from skipvision.skip.policies.base import NeedsClsAttention, SkipPolicy, TokenSplit

FALLBACKS = ("mean_similarity", "error")


@SKIP_POLICIES.register("attention_score", tiny={"num_retained": 2})
class AttentionScorePolicy(NeedsClsAttention, SkipPolicy):
    """Retains the N_r tokens with the highest [CLS] attention at the encoder's feature layer (summed over heads,
    as the LLaVA setting of the paper), in raster order.

    Encoders without a [CLS] token (CNNs, SigLIP) give no scores. Then ``fallback`` decides:

    - ``"mean_similarity"`` (default): each token is scored by the cosine similarity of its features to the image's
      mean token. The mean token stands in for the global summary a [CLS] token would be, so tokens that agree with
      it play the part of the tokens [CLS] attends to. This is a CLS-free proxy, not the paper's rule.
    - ``"error"``: raise a ValueError, for runs that must use the paper's rule exactly.
    """

    def __init__(
        self,
        num_retained: int | None = None,
        retain_ratio: float | None = None,
        fallback: str = "mean_similarity",
        drop: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(num_retained, retain_ratio, drop)
        if fallback not in FALLBACKS:
            raise MethodError(f"attention_score: fallback must be one of {', '.join(FALLBACKS)}, got {fallback!r}")
        self.fallback = fallback

    def select(self, features: torch.Tensor, cls_scores: torch.Tensor | None, num_retained: int) -> TokenSplit:
        if cls_scores is None:
            if self.fallback == "error":
                raise MethodError(
                    "attention_score got no [CLS] attention scores: the vision encoder has no [CLS] token "
                    "(e.g. a CNN or SigLIP) or does not provide its attention. Use an encoder with a [CLS] token "
                    "(timm ViT, CLIP) or set fallback='mean_similarity'."
                )
            cls_scores = mean_similarity(features)  # [B, N]
        top = cls_scores.topk(num_retained, dim=1).indices  # [B, N_r], by score
        return TokenSplit.from_indices(top, features.shape[1], scores=cls_scores)


def mean_similarity(features: torch.Tensor) -> torch.Tensor:
    """Cosine similarity [B, N] of each token of ``features`` [B, N, D] to its image's mean token."""
    mean = features.mean(dim=1, keepdim=True)  # [B, 1, D]
    return F.cosine_similarity(features.float(), mean.float(), dim=-1)  # [B, N]
