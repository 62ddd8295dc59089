"""Physical removal of skipped positions from a KV cache after prefill (METHOD.md section 4, step 2).

After the prompt has been prefilled exactly as in training, the keys and values of every skipped position are
removed from every layer's cache, per sample, so the memory is really freed and each decode step attends over the
reduced cache only.

A :class:`Removal` is planned once from a keep-mask ``[B, T]`` and applied to every layer and to the 2-D mask:

* rows may drop different numbers of positions (a text-only prompt next to an image prompt, two images next to
  one): the cache keeps ``T - min(drops)`` positions per row; a row that drops fewer keeps some of its dropped
  positions as *fillers* whose mask entry is 0, so they are never attended to (exactly like left padding);
* the 2-D attention mask ``[B, T]`` is pruned the same way (:func:`prune_mask`), fillers zeroed, then extended by
  ones for each generated token, so its columns keep lining up with the cache's positions;
* position ids must keep counting the removed tokens (METHOD.md section 4, step 3): pass explicit ``position_ids``
  equal to each row's true position (prompt's real length + step). Never derive them from
  ``cache.get_seq_length()`` or from the pruned mask's cumulative sum: both silently compact the positions, and the
  cached keys were rotated (RoPE) at their original positions.

transformers 5.x keeps no per-layer length counter for :class:`~transformers.cache_utils.DynamicLayer`: the length is
read from ``keys.shape[-2]``, so replacing ``keys``/``values`` is enough. Sliding-window layers carry a
``cumulative_length`` that would go stale, so they are rejected.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.profiler import record_function
from transformers import DynamicCache


@dataclass
class Removal:
    """Which cache positions survive, per row, in their original order.

    ``index`` [B, K] long: positions into the prefilled sequence (K = T - the smallest drop count);
    ``valid`` [B, K] bool: False at fillers (dropped positions kept only to make the tensor rectangular).
    """

    index: torch.Tensor
    valid: torch.Tensor
    source_length: int  # T, the prefilled length the plan was made for

    @classmethod
    def plan(cls, keep: torch.Tensor) -> Removal:
        """From a keep-mask [B, T] bool (False: remove). Computed once, applied to every layer."""
        if keep.dim() != 2 or keep.dtype != torch.bool:
            raise ValueError(f"keep must be a [B, T] bool tensor, got shape {tuple(keep.shape)} dtype {keep.dtype}")
        kept = keep.sum(-1)  # [B]
        width = int(kept.max()) if keep.numel() else 0
        # Fillers: a row's first (width - kept) dropped positions.
        drop_rank = (~keep).long().cumsum(-1)  # [B, T], 1-based rank among the row's dropped positions
        filler = ~keep & (drop_rank <= (width - kept)[:, None])  # [B, T]
        chosen = keep | filler  # [B, T], exactly `width` per row
        # A stable sort puts the chosen positions (key 0) first, in their original order.
        index = torch.sort((~chosen).to(torch.int8), dim=-1, stable=True).indices[:, :width]  # [B, K]
        return cls(index, keep.gather(1, index), keep.shape[1])

    @property
    def width(self) -> int:
        """K: positions per row after removal."""
        return self.index.shape[1]


def prune_mask(mask: torch.Tensor, removal: Removal) -> torch.Tensor:
    """Prune a 2-D attention mask like the cache; fillers become 0. mask [B, T] -> [B, K]."""
    if mask.shape[0] != removal.index.shape[0]:
        raise ValueError(f"mask has {mask.shape[0]} rows but the removal plan {removal.index.shape[0]}")
    index = removal.index.to(mask.device)
    return mask.gather(1, index) * removal.valid.to(mask.device)  # [B, K]


@torch.no_grad()
def drop_cache_positions(cache: DynamicCache, removal: Removal, layers: Sequence[int] | None = None) -> None:
    """Keep only ``removal.index`` in the keys and values of every layer (or of ``layers``), in place.

    METHOD.md section 4, step 2: after prefill, the K/V of every skipped position leave the cache (memory is
    freed: the tensors are replaced by smaller ones). Afterwards prune the 2-D mask with :func:`prune_mask` and keep
    passing explicit true positions (see the module docstring).

    cache layers: keys/values [B, H_kv, T, hd] -> [B, H_kv, K, hd].
    """
    picked = range(len(cache.layers)) if layers is None else layers
    chosen = [(i, cache.layers[i]) for i in picked]
    chosen = [(i, layer) for i, layer in chosen if getattr(layer, "is_initialized", False) and layer.keys.numel()]
    batch = removal.index.shape[0]
    for i, layer in chosen:  # validate every layer first, so a failure leaves the cache untouched
        if getattr(layer, "is_sliding", False) or hasattr(layer, "cumulative_length"):
            raise TypeError(f"layer {i} ({type(layer).__name__}) tracks its own length; only DynamicLayer is supported")
        b, _, t, _ = layer.keys.shape  # [B, H_kv, T, hd]
        if (b, t) != (batch, removal.source_length):
            raise ValueError(
                f"layer {i} caches [B={b}, T={t}] but the removal plan is for [B={batch}, T={removal.source_length}]"
            )
    with record_function("skipvision::kv_removal"):
        for _, layer in chosen:
            b, h, _, hd = layer.keys.shape  # [B, H_kv, T, hd]
            base = removal.index.to(layer.keys.device)[:, None, :, None]  # [B, 1, K, 1]
            layer.keys = layer.keys.gather(2, base.expand(b, h, -1, hd))  # [B, H_kv, K, hd]
            layer.values = layer.values.gather(2, base.expand(b, h, -1, layer.values.shape[-1]))  # [B, H_kv, K, hd_v]


def kv_cache_bytes(cache: DynamicCache) -> int:
    """Total bytes held by all layers' keys and values."""
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total
