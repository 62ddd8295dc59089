"""The Skip-Vision visual token pipeline after the projector (docs/method.md "Token pipeline").

Per image: split the N projected tokens into retained R and candidates C (skip policy), merge C into S
(compressor, N_s tokens), pool the summaries s_R = pool(R) and s_S = pool(S), and lay them out as
``[R][s_R][S][s_S]``. The FFN runs on R and both summaries; S takes part in attention only (Skip-FFN). With the
``none`` policy every token is retained and the layout is the N tokens themselves (the full model); with
``merge_only`` (compression-only peer, docs/method.md "Peers") the layout is the N tokens merged to ``merge_to``, all
with FFN.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.profiler import record_function

from skipvision.registry import COMPRESSORS, SKIP_POLICIES
from skipvision.skip.policies.base import SkipPolicy
from skipvision.skip.summary import SummaryPooling


@dataclass
class VisualTokens:
    tokens: torch.Tensor  # [M, K, D] the K slot tokens of each of the M images
    ffn: torch.Tensor  # [K] bool, False at the skipped (S) slots
    aux_loss: torch.Tensor | None = None


class SkipVisionTokens(nn.Module):
    """Policy split + merge + summaries with a fixed number of slots per image (``num_slots``).

    ``num_skipped`` is N_s (None: no merge, N_s = N - N_r); ``summary_tokens`` switches s_R and s_S off (ablation).
    """

    def __init__(
        self,
        num_tokens: int,
        dim: int,
        policy: Any = "none",
        compressor: Any = "token_merge",
        num_skipped: int | None = None,
        summary_tokens: bool = True,
    ) -> None:
        super().__init__()
        self.policy: SkipPolicy = SKIP_POLICIES.build(policy, optional={"dim": dim})
        self.compressor = COMPRESSORS.build(compressor)
        self.num_tokens = num_tokens
        self.merge_to = self.policy.merge_to
        if self.merge_to is not None and not 1 <= self.merge_to <= num_tokens:
            raise ValueError(
                f"{type(self.policy).__name__}: num_tokens (tokens kept per image) must be between 1 and the "
                f"{num_tokens} visual tokens of an image; got {self.merge_to}"
            )
        self.num_retained = self.policy.num_retained_for(num_tokens) if self.skips else num_tokens
        candidates = num_tokens - self.num_retained
        self.num_skipped = candidates if num_skipped is None else num_skipped
        if self.skips and not 1 <= self.num_skipped <= candidates:
            raise ValueError(
                f"num_skipped (N_s) must be between 1 and the {candidates} skip candidates "
                f"(N={num_tokens}, N_r={self.num_retained}); got {self.num_skipped}"
            )
        self.summary = SummaryPooling(dim) if summary_tokens and self.skips else None

    @property
    def skips(self) -> bool:
        """False for the full-compute peers' policies (``none``, ``merge_only``, ``fastv``): nothing skipped."""
        return self.policy.skips

    @property
    def num_slots(self) -> int:
        """Slots one image fills in the LLM sequence: N_r + N_s (+ 2 summaries); N or ``merge_to`` without skipping."""
        if not self.skips:
            return self.num_tokens if self.merge_to is None else self.merge_to
        return self.num_retained + self.num_skipped + (2 if self.summary is not None else 0)

    def slot_ffn(self, device: torch.device | None = None) -> torch.Tensor:
        """[K] bool: which slots run the FFN (all but S)."""
        ffn = torch.ones(self.num_slots, dtype=torch.bool, device=device)
        if self.skips:
            start = self.num_retained + (1 if self.summary is not None else 0)
            ffn[start : start + self.num_skipped] = False
        return ffn

    def forward(self, feats: torch.Tensor, cls_scores: torch.Tensor | None) -> VisualTokens:
        """``feats`` [M, N, D] projected tokens (with the encoder's [CLS] scores [M, N] or None) -> slot tokens."""
        if not self.skips:
            if self.merge_to is None:
                return VisualTokens(feats, self.slot_ffn(feats.device))
            with record_function("skipvision::merge"):
                tokens = self.compressor(feats, self.merge_to)  # [M, merge_to, D]
            return VisualTokens(tokens, self.slot_ffn(feats.device))
        with record_function("skipvision::policy_split"):
            split = self.policy.split(feats, cls_scores)
            feats = self.policy.weight_retained(feats, split)  # [M, N, D]
            dim = feats.shape[-1]
            kept = feats.gather(1, split.retained[..., None].expand(-1, -1, dim))  # [M, N_r, D]
            cands = feats.gather(1, split.candidates[..., None].expand(-1, -1, dim))  # [M, N - N_r, D]
        with record_function("skipvision::merge"):
            merged = self.compressor(cands, self.num_skipped)  # [M, N_s, D]
        with record_function("skipvision::summaries"):
            if self.summary is None:
                parts = [kept, merged]
            else:
                parts = [kept, self.summary(kept)[:, None], merged, self.summary(merged)[:, None]]
            tokens = torch.cat(parts, dim=1)  # [M, K, D]
        return VisualTokens(tokens, self.slot_ffn(feats.device), split.aux_loss)
