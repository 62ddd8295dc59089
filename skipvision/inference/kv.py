"""Physical removal of positions from a KV cache after prefill (docs/method.md "KV removal").

After the prompt has been prefilled exactly as in training, the keys and values of every skipped position are
removed from every layer's cache, per sample, so the memory is really freed and each decode step attends over the
reduced cache only.

A :class:`Removal` is planned once from a keep-mask ``[B, T]`` and applied to every layer and to the 2-D mask:

* rows may drop different numbers of positions (a text-only prompt next to an image prompt, two images next to
  one): the cache keeps ``T - min(drops)`` positions per row; a row that drops more keeps some of its dropped
  positions as *fillers* whose mask entry is 0, so they are never attended to (exactly like left padding);
* the 2-D attention mask ``[B, T]`` is pruned the same way (:func:`prune_mask`), fillers zeroed;
* position ids must keep counting the removed tokens: pass explicit ``position_ids`` equal to each row's true
  position (prompt's real length + step). Never derive them from ``cache.get_seq_length()`` or from the pruned
  mask's cumulative sum: both silently compact the positions, and the cached keys were rotated (RoPE) at their
  original positions.

Full and sliding-window layers (docs/adapters.md "Caches"): after prefill every layer of a ``DynamicCache`` holds
the prompt's columns in order, a full-attention layer (``DynamicLayer``) all T of them, a sliding-window layer
(``DynamicSlidingWindowLayer``) only the last ``min(T, window - 1)``. Full layers are gathered to exactly
``removal.index``. A sliding layer is gathered to the *last* m of those columns, m being the most any row keeps
inside the layer's stored columns, so every layer's columns stay a suffix of one shared column list (the decode
masks rely on it, see :meth:`skipvision.adapters.DecoderAdapter.masks`). Columns of that suffix the layer no longer
holds are older than the window for every later query, so their slots get any stored column and are masked by
position. transformers keeps no length counter for full layers (the length is ``keys.shape[-2]``); a sliding
layer's ``cumulative_length`` only sizes transformers' own masks, which decoding replaces with masks built from
true positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.profiler import record_function
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer


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


def _kept_columns(layer: DynamicLayer, removal: Removal, index: int) -> torch.Tensor:
    """Which stored columns of ``layer`` survive: [B, K_layer] indices into its keys' T axis."""
    batch, source = removal.index.shape[0], removal.source_length
    b, _, t, _ = layer.keys.shape  # [B, H_kv, t, hd]
    sliding = isinstance(layer, DynamicSlidingWindowLayer)
    expected = min(source, layer.sliding_window - 1) if sliding else source
    if (b, t) != (batch, expected):
        raise ValueError(
            f"layer {index} caches [B={b}, T={t}] but the removal plan is for [B={batch}, T={source}]"
            + (f" (a sliding window of {layer.sliding_window} keeps {expected})" if sliding else "")
        )
    if t == source:
        return removal.index
    first = source - t  # the first prompt column the layer still holds
    inside = int((removal.index >= first).sum(-1).max())
    return (removal.index[:, removal.index.shape[1] - inside :] - first).clamp(min=0)  # [B, m]


@torch.no_grad()
def drop_cache_positions(cache: DynamicCache, removal: Removal, layers: Sequence[int] | None = None) -> None:
    """Keep only ``removal.index`` in the keys and values of every layer (or of ``layers``), in place.

    Afterwards prune the 2-D mask with :func:`~skipvision.inference.kv.prune_mask` and keep passing explicit true
    positions (docs/method.md "KV removal"). Full layers: [B, H_kv, T, hd] -> [B, H_kv, K, hd]; sliding layers:
    [B, H_kv, min(T, W - 1), hd] -> [B, H_kv, m, hd] (see the module docstring). Every layer is checked before any
    is changed, so a failure leaves the cache untouched.
    """
    picked = range(len(cache.layers)) if layers is None else layers
    chosen = [(i, cache.layers[i]) for i in picked]
    chosen = [(i, layer) for i, layer in chosen if layer.is_initialized and layer.keys.numel()]
    for i, layer in chosen:
        if type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer):
            raise TypeError(f"layer {i} is a {type(layer).__name__}; KV removal supports DynamicCache layers only")
    columns = [_kept_columns(layer, removal, i) for i, layer in chosen]
    with record_function("skipvision::kv_removal"):
        for (_, layer), index in zip(chosen, columns, strict=True):
            b, h, _, hd = layer.keys.shape  # [B, H_kv, t, hd]
            base = index.to(layer.keys.device)[:, None, :, None]  # [B, 1, K, 1]
            layer.keys = layer.keys.gather(2, base.expand(b, h, -1, hd))  # [B, H_kv, K, hd]
            layer.values = layer.values.gather(2, base.expand(b, h, -1, layer.values.shape[-1]))  # [B, H_kv, K, hd_v]


def stored_lengths(cache: DynamicCache, layer_types: Sequence[str]) -> dict[str, int]:
    """Columns each layer type holds now (every layer of a type holds the same number after prefill + removal)."""
    lengths: dict[str, int] = {}
    for kind, layer in zip(layer_types, cache.layers, strict=True):
        n = layer.keys.shape[-2] if layer.is_initialized else 0
        if lengths.setdefault(kind, n) != n:
            raise RuntimeError(f"{kind} cache layers hold different lengths ({lengths[kind]} and {n})")
    return lengths


def kv_cache_bytes(cache: DynamicCache) -> int:
    """Total bytes held by all layers' keys and values."""
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def keep_last(cache: DynamicCache, layers: Sequence[int], length: int) -> None:
    """Crop the given layers to their last ``length`` columns (older ones must be outside every later query's
    window: used to give all sliding layers the same suffix after FastV, docs/adapters.md "Caches")."""
    for i in layers:
        layer = cache.layers[i]
        start = layer.keys.shape[2] - length
        layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]  # [B, H_kv, length, hd]
