"""Attention masks from true positions, in the attention implementation's own format (docs/adapters.md "Masks").

After KV removal (docs/method.md "KV removal") or an in-LLM token drop (FastV), a cache column no longer sits at
the position its index says: the columns are a subset of the prompt, with fillers, in position order. transformers'
mask builders derive causality and sliding windows from indices, so these masks are built from the columns' true
positions instead: directly with tensor ops for sdpa (bool) and eager (additive float), otherwise through
transformers' own builder as an ``and_mask_function`` over a bidirectional base, which gives the format of
``config._attn_implementation`` (flex: ``BlockMask``) and applies the padding mask.
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
    if implementation in ("sdpa", "eager"):
        return direct_mask(query, key, key_valid.to(device), window, embeds.dtype, implementation)
    return builder_mask(config, embeds, query, key, key_valid, window)


def builder_mask(
    config: PreTrainedConfig,
    embeds: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    key_valid: torch.Tensor,
    window: int | None,
) -> Any:
    """:func:`position_mask` through transformers' builder, in any attention implementation's format."""

    def visible(batch_idx: torch.Tensor, head_idx: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor):
        q, k = query[batch_idx, q_idx], key[batch_idx, kv_idx]
        seen = k <= q
        return seen & (q - k < window) if window is not None else seen

    return create_bidirectional_mask(
        config=config,
        inputs_embeds=embeds,
        attention_mask=key_valid.to(device=embeds.device, dtype=torch.bool),
        and_mask_function=visible,
    )


def direct_mask(
    query: torch.Tensor, key: torch.Tensor, valid: torch.Tensor, window: int | None, dtype: torch.dtype, kind: str
) -> torch.Tensor:
    """The same rule built directly with tensor ops, for sdpa (bool) and eager (additive) attention: transformers'
    builder evaluates the rule through nested ``vmap`` s, whose cost dominated a decode step's ms/token and each
    in-LLM drop's prefill (about 3 ms a stage at 600 tokens on CPU). A query that sees no key at all (a padding or
    filler query before every kept key) sees every key instead, so its output stays finite; its output is never
    read. query [B, q], key/valid [B, k] -> [B, 1, q, k]."""
    see = valid.bool()[:, None, :] & (key[:, None, :] <= query[:, :, None])  # [B, q, k]
    if window is not None:
        see &= query[:, :, None] - key[:, None, :] < window
    see |= ~see.any(-1, keepdim=True)  # fully masked rows: no NaN from an all -inf softmax
    see = see[:, None]  # [B, 1, q, k]
    if kind == "sdpa":
        return see
    return torch.zeros(see.shape, dtype=dtype, device=see.device).masked_fill(~see, torch.finfo(dtype).min)
