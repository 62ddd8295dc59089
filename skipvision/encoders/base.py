"""The interface every vision encoder implements (METHOD.md section 2, first line of the pipeline)."""

from __future__ import annotations

import torch
from torch import nn


class VisionEncoder(nn.Module):
    """Maps pixels to patch features at the feature layer, prefix (CLS/register) tokens dropped.

    Subclasses set ``out_dim`` (C_v), ``num_tokens`` (N), ``image_size`` (H, W) and the normalisation ``mean`` and
    ``std`` the data pipeline must apply, and implement ``forward(pixel_values [B, 3, H, W]) -> [B, N, C_v]``.
    Patch tokens come in raster order.
    """

    out_dim: int
    num_tokens: int
    image_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError
