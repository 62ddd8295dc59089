"""Simple alternatives to token merge for C -> S: average pooling and no compression.

Where they enter the method: docs/method.md "Token pipeline", step 4.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from skipvision.compressors.token_merge import check_num_out
from skipvision.registry import COMPRESSORS


@COMPRESSORS.register("avg_pool", tiny={})
class AvgPool(nn.Module):
    """Adaptive average pooling along the token sequence in its given order; ignores token content."""

    def forward(self, x: Tensor, num_out: int) -> Tensor:
        """[B, n, D] -> [B, num_out, D]: output k averages the k-th of num_out near-equal consecutive windows."""
        check_num_out(x.shape[1], num_out)
        return F.adaptive_avg_pool1d(x.transpose(1, 2), num_out).transpose(1, 2)  # [B, D, n] -> [B, num_out, D]


@COMPRESSORS.register("identity", tiny={})
class Identity(nn.Module):
    """No compression (N_s = |C|): returns the candidates unchanged."""

    def forward(self, x: Tensor, num_out: int) -> Tensor:
        """[B, n, D] -> [B, n, D]; ``num_out`` must equal n."""
        if num_out != x.shape[1]:
            raise ValueError(
                f"the identity compressor keeps all {x.shape[1]} tokens, so num_out must be {x.shape[1]}; got {num_out}"
            )
        return x
