"""Physical removal of skipped positions from a KV cache after prefill (METHOD.md section 4, step 2).

After the prompt has been prefilled exactly as in training, the keys and values of every skipped position are
removed from every layer's cache, per sample, so the memory is really freed and each decode step attends over the
reduced cache only.

Two things must follow the cache once positions are removed:

* the 2-D attention mask ``[B, T]`` must be pruned the same way (:func:`prune_mask`), then extended by ones for each
  generated token, so that its columns keep lining up with the cache's positions;
* position ids must keep counting the removed tokens (METHOD.md section 4, step 3): pass explicit ``position_ids``
  equal to each row's true position (prompt's real length + step). Never derive them from
  ``cache.get_seq_length()`` or from the pruned mask's cumulative sum: both silently compact the positions, and the
  cached keys were rotated (RoPE) at their original positions.

transformers 5.x keeps no per-layer length counter for :class:`~transformers.cache_utils.DynamicLayer`: the length is
read from ``keys.shape[-2]``, so replacing ``keys``/``values`` is enough. Sliding-window layers carry a
``cumulative_length`` that would go stale, so they are rejected.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache


def _kept_indices(keep: torch.Tensor) -> torch.Tensor:
    """Per-row indices of the kept positions, in order. keep [B, T] bool -> [B, T - n_drop] long.

    Raises ValueError unless every row drops the same number of positions."""
    if keep.dim() != 2 or keep.dtype != torch.bool:
        raise ValueError(f"keep must be a [B, T] bool tensor, got shape {tuple(keep.shape)} dtype {keep.dtype}")
    drops = (~keep).sum(-1)  # [B]
    if bool((drops != drops[0]).any()):
        raise ValueError(f"every row must drop the same number of positions, got drop counts {drops.tolist()}")
    n_keep = keep.shape[1] - int(drops[0])
    # A stable sort puts the kept positions (key 0) first, in their original order.
    order = torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices  # [B, T]
    return order[:, :n_keep]  # [B, T - n_drop]


def prune_mask(mask: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Prune a 2-D attention mask like the cache. mask [B, T], keep [B, T] bool -> [B, T - n_drop]."""
    if mask.shape != keep.shape:
        raise ValueError(f"mask {tuple(mask.shape)} and keep {tuple(keep.shape)} must have the same shape")
    return mask.gather(1, _kept_indices(keep).to(mask.device))  # [B, T - n_drop]


@torch.no_grad()
def drop_cache_positions(cache: DynamicCache, keep: torch.Tensor) -> None:
    """Remove, per sample, the positions where ``keep`` is False from every layer's keys and values, in place.

    METHOD.md section 4, step 2: after prefill, the K/V of every skipped position leave the cache (memory is
    freed: the tensors are replaced by smaller ones). Every row must drop the same number of positions so the
    tensors stay rectangular (left padding stays in the cache and stays masked). Afterwards prune the 2-D mask with
    :func:`prune_mask` and keep passing explicit true positions (see the module docstring).

    cache layers: keys/values [B, H_kv, T, hd] -> [B, H_kv, T - n_drop, hd]; keep: [B, T] bool.
    """
    idx = _kept_indices(keep)  # [B, T'] with T' = T - n_drop, computed once for all layers
    batch, seq = keep.shape
    layers = [layer for layer in cache.layers if getattr(layer, "is_initialized", False) and layer.keys.numel() > 0]
    for i, layer in enumerate(layers):  # validate every layer first, so a failure leaves the cache untouched
        if getattr(layer, "is_sliding", False) or hasattr(layer, "cumulative_length"):
            raise TypeError(f"layer {i} ({type(layer).__name__}) tracks its own length; only DynamicLayer is supported")
        b, _, t, _ = layer.keys.shape  # [B, H_kv, T, hd]
        if (b, t) != (batch, seq):
            raise ValueError(f"layer {i} caches [B={b}, T={t}] but keep is [B={batch}, T={seq}]")
    for layer in layers:
        b, h, _, hd = layer.keys.shape  # [B, H_kv, T, hd]
        base = idx.to(layer.keys.device)[:, None, :, None]  # [B, 1, T', 1]
        layer.keys = layer.keys.gather(2, base.expand(b, h, -1, hd))  # [B, H_kv, T', hd]
        layer.values = layer.values.gather(2, base.expand(b, h, -1, layer.values.shape[-1]))  # [B, H_kv, T', hd_v]


def kv_cache_bytes(cache: DynamicCache) -> int:
    """Total bytes held by all layers' keys and values."""
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total
