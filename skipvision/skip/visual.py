"""The Skip-Vision visual token pipeline after the projector (docs/method.md "Token pipeline").

Per image: split the N projected tokens into retained R and candidates C (skip policy), merge C into S
(compressor, N_s tokens), pool the summaries s_R = pool(R) and s_S = pool(S), and lay them out as
``[R][s_R][S][s_S]``. The FFN runs on R and both summaries; S takes part in attention only (Skip-FFN). The steps
are the method's (docs/methods.md "The method interface"): with the ``none`` policy every token is retained and the
layout is the N tokens themselves (the full model); with ``merge_only`` (compression-only peer, docs/method.md
"Peers") it is the N tokens merged to ``num_tokens``, all with FFN.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from skipvision.registry import COMPRESSORS, SKIP_POLICIES
from skipvision.skip.layout import SlotLayout, VisualTokens
from skipvision.skip.policies.base import SkipPolicy
from skipvision.skip.summary import SummaryPooling

__all__ = ["SkipVisionTokens", "VisualTokens"]


class SkipVisionTokens(nn.Module):
    """The visual stage of a method: its ``policy`` (the registered method) lays out K slots per image
    (``layout``) and fills them from the projected tokens, with the recipe's ``compressor`` and, when the layout has
    summaries, the shared summary pooling.

    ``num_skipped`` is N_s (None: no merge, N_s = N - N_r); ``summary_tokens`` switches s_R and s_S off (ablation).
    ``num_layers`` (the LLM's depth) reaches the methods that hold per-layer modules (mod_router's routers).
    """

    def __init__(
        self,
        num_tokens: int,
        dim: int,
        policy: Any = "none",
        compressor: Any = "token_merge",
        num_skipped: int | None = None,
        summary_tokens: bool = True,
        num_layers: int | None = None,
    ) -> None:
        super().__init__()
        self.policy: SkipPolicy = SKIP_POLICIES.build(policy, optional={"dim": dim, "num_layers": num_layers})
        self.compressor = COMPRESSORS.build(compressor)
        self.num_tokens = num_tokens
        self.layout: SlotLayout = self.policy.layout(num_tokens, num_skipped, summary_tokens)
        self.summary = SummaryPooling(dim) if self.layout.summaries else None

    @property
    def num_slots(self) -> int:
        """Slots one image fills in the LLM sequence: N_r + N_s (+ 2 summaries) with Skip-Vision, N without skipping,
        the merged count for compression-only."""
        return self.layout.slots

    def forward(self, feats: torch.Tensor, cls_scores: torch.Tensor | None) -> VisualTokens:
        """``feats`` [M, N, D] projected tokens (with the encoder's [CLS] scores [M, N] or None) -> slot tokens."""
        return self.policy.tokens(feats, cls_scores, self.layout, self.compressor, self.summary)
