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
    implementation = config._attn_implementation
    if query.shape[1] == 1 and implementation in ("sdpa", "eager"):
        return _decode_step_mask(query, key, key_valid.to(device), window, embeds.dtype, implementation)

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


def _decode_step_mask(
    query: torch.Tensor, key: torch.Tensor, valid: torch.Tensor, window: int | None, dtype: torch.dtype, kind: str
) -> torch.Tensor:
    """The same rule for one query per row, built directly (a decode step: the builder's per-step cost dominated
    ms/token). The step's own column is valid and at the query's position, so no row is fully masked; sdpa takes
    the bool mask, eager an additive one. query [B, 1], key/valid [B, k] -> [B, 1, 1, k]."""
    see = valid.bool() & (key <= query)  # [B, k]
    if window is not None:
        see &= query - key < window
    see = see[:, None, None, :]  # [B, 1, 1, k]
    if kind == "sdpa":
        return see
    return torch.zeros(see.shape, dtype=dtype, device=see.device).masked_fill(~see, torch.finfo(dtype).min)
