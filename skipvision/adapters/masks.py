"""Attention masks from true positions, in the attention implementation's own format (docs/adapters.md "Masks").

After KV removal (docs/method.md "KV removal") or an in-LLM token drop (FastV), a cache column no longer sits at
the position its index says: the columns are a subset of the prompt, with fillers, in position order. transformers'
mask builders derive causality and sliding windows from indices, so these masks are built from the columns' true
positions instead and handed to transformers' own builder as an ``and_mask_function`` over a bidirectional base,
which turns them into the format of ``config._attn_implementation`` (sdpa: bool, eager: additive float, flex:
``BlockMask``) and applies the padding mask.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedConfig
from transformers.masking_utils import create_bidirectional_mask


def position_mask(
    config: PreTrainedConfig,
    embeds: torch.Tensor,
    query_positions: torch.Tensor,
    key_positions: torch.Tensor,
    key_valid: torch.Tensor,
    window: int | None,
) -> Any:
    """A 4-D mask [B, 1, q, k]: query i may read key j iff j is valid, ``key_positions[j] <= query_positions[i]``
    and, with a ``window``, ``query_positions[i] - key_positions[j] < window`` (transformers' sliding-window rule).

    ``embeds`` [B, q, D] gives batch, query length, dtype and device; positions are [B, q] / [B, k] long tensors,
    ``key_valid`` [B, k] (bool or 0/1).
    """
    device = embeds.device
    query = query_positions.to(device)  # [B, q]
    key = key_positions.to(device)  # [B, k]

    def visible(batch_idx: torch.Tensor, head_idx: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor):
        q, k = query[batch_idx, q_idx], key[batch_idx, kv_idx]
        seen = k <= q
        return seen & (q - k < window) if window is not None else seen

    return create_bidirectional_mask(
        config=config,
        inputs_embeds=embeds,
        attention_mask=key_valid.to(device=device, dtype=torch.bool),
        and_mask_function=visible,
    )
