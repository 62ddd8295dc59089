"""Compression-only peer: merge each image's tokens to N_r + N_s, all with full compute (docs/method.md "Peers").

The same token count as Skip-Vision reaches the LLM, but no token is skipped and no summary is added, so the
comparison isolates what skipping and the summaries contribute on top of plain token compression.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.profiler import record_function

from skipvision.errors import MethodError
from skipvision.registry import SKIP_POLICIES
from skipvision.skip.layout import SlotLayout, VisualTokens
from skipvision.skip.policies.none import NoSkip


@SKIP_POLICIES.register("merge_only", tiny={"num_tokens": 4})
class MergeOnly(NoSkip):
    """Each image's N visual tokens are merged into ``num_tokens`` (the compressor of the recipe, token merge by
    default) and all of them run the FFN."""

    def __init__(self, num_tokens: int) -> None:
        super().__init__()
        if num_tokens < 1:
            raise MethodError(f"merge_only: num_tokens (tokens per image, N_r + N_s) must be >= 1, got {num_tokens}")
        self.num_tokens = num_tokens

    def layout(self, num_tokens: int, num_skipped: int | None, summary_tokens: bool) -> SlotLayout:
        """``num_tokens`` full-compute slots, at most the image's N."""
        if self.num_tokens > num_tokens:
            raise MethodError(
                f"MergeOnly: num_tokens (tokens kept per image) must be between 1 and the {num_tokens} visual tokens "
                f"of an image; got {self.num_tokens}"
            )
        return SlotLayout(self.num_tokens)

    def tokens(
        self,
        features: torch.Tensor,
        cls_scores: torch.Tensor | None,
        layout: SlotLayout,
        compressor: nn.Module,
        summary: nn.Module | None,
    ) -> VisualTokens:
        """``features`` [M, N, D] merged by ``compressor`` to [M, K, D]."""
        with record_function("skipvision::merge"):
            tokens = compressor(features, layout.slots)  # [M, K, D]
        return VisualTokens(tokens, layout.ffn(features.device))
