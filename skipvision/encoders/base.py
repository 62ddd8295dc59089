"""The interface every vision encoder implements (docs/method.md "Token pipeline", step 1)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn


class VisionEncoder(nn.Module):
    """Maps pixels to patch features at the feature layer, prefix (CLS/register) tokens dropped.

    Subclasses set ``out_dim`` (C_v), ``num_tokens`` (N), ``image_size`` (H, W) and the normalisation ``mean`` and
    ``std`` the data pipeline must apply, and implement ``forward(pixel_values [B, 3, H, W]) -> [B, N, C_v]``.
    Patch tokens come in raster order.

    Encoders with a [CLS] token also set ``has_cls`` and override ``forward_with_cls_attention``, which gives the
    paper's selection scores in the same pass as the features.
    """

    out_dim: int
    num_tokens: int
    image_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    has_cls: bool = False
    """Whether ``forward_with_cls_attention`` returns [CLS] attention scores (False: it returns None)."""
    pad_to_square: bool = False
    """Pad images to a square with the mean colour before the checkpoint's image processor (LLaVA-1.5)."""

    def image_processor_folder(self) -> Path | None:
        """A folder whose transformers image processor prepares this encoder's images (skipvision/data/views.py);
        None: a bicubic resize to ``image_size`` and ``mean``/``std`` normalisation."""
        return None

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def blocks(self) -> list[nn.Module]:
        """The repeated transformer blocks (or stages), each one FSDP unit (docs/distributed.md "FSDP"); empty: the
        encoder is sharded as a single unit."""
        return []

    def forward_with_cls_attention(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Features [B, N, C_v] and the [CLS] attention at the feature layer, summed over heads, at the N patch
        positions [B, N]; None for encoders without a [CLS] token (CNNs, SigLIP)."""
        return self(pixel_values), None


def cls_attention_scores(query: torch.Tensor, keys: torch.Tensor, scale: float, num_prefix: int) -> torch.Tensor:
    """The attention of the [CLS] query over all keys, softmax per head, summed over heads, at the patch positions.

    Only the [CLS] row is computed (O(T) per head, no [T, T] map), so the encoder keeps its fused attention
    (docs/method.md "Policies"). ``query`` [B, H, 1, d] is the [CLS] query, ``keys`` [B, H, T, d] all T tokens'
    keys, the first ``num_prefix`` of which are prefix tokens and are dropped from the result [B, T - num_prefix].
    """
    logits = (query.float() @ keys.float().transpose(-2, -1)) * scale  # [B, H, 1, T]
    probs = logits.softmax(dim=-1)  # [B, H, 1, T]
    return probs.sum(dim=1)[:, 0, num_prefix:]  # [B, N]


def run_scoring_block_input(
    block: nn.Module, run: Callable[[], torch.Tensor], score: Callable[[torch.Tensor], torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``run()`` (the encoder's forward, giving features) while a forward pre-hook on ``block`` computes ``score(x)``
    without gradient from the block's input ``x`` [B, T, C]. Scoring inside the block's call means its weights are
    there even when the block is an FSDP unit whose weights are gathered only during its call
    (docs/distributed.md "FSDP")."""
    scores: list[torch.Tensor] = []

    def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        with torch.no_grad():
            scores.append(score(args[0]))

    handle = block.register_forward_pre_hook(hook)
    try:
        feats = run()
    finally:
        handle.remove()
    return feats, scores[0]
