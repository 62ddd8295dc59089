"""FastV inside one forward of the unmodified transformers model (docs/method.md "Peers").

FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", ECCV 2024) is training-free: at layer K the share
``ratio`` of image tokens that the last prompt token attends to least in layer K - 1 is dropped, so layers K..L-1
never see them. Here they also leave the KV cache of every layer, so decoding runs over the same reduced prompt
(docs/method.md "KV removal"). One prefill forward, with forward pre-hooks on the decoder layers:

* layer K - 1: from the layer's input hidden states, compute only the attention row the method needs, the last
  prompt token's query against all T keys, heads averaged (:func:`last_token_attention`; never the full attention
  matrix, so any attention implementation runs the forward). Per row the ``floor(ratio * image slots)``
  lowest-scored image positions are dropped and :class:`~skipvision.inference.kv.Removal` plans the survivors (next
  to a row that drops fewer, e.g. a text-only one, a row keeps some dropped positions as masked fillers, exactly like
  left padding).
* layer K: the hidden states are gathered to the survivors; layers K..L-1 get reduced kwargs: the attention mask of
  their layer type built from the survivors' true positions (sliding windows by position, fillers masked; see
  :mod:`skipvision.adapters.masks`), and the gathered cos/sin and position ids. Positions are the true ones, never
  recomputed, so RoPE phases stay those of the full sequence.
* after the forward, layers < K (which cached all T positions) are trimmed to the survivors, so every cache layer
  holds the same columns (sliding layers a suffix of them); decode with the pruned 2-D mask and explicit true
  positions.

Everything family-specific (the attention-input norm, q/k projections and norms, RoPE, score scaling and
soft-capping, layer types) comes from the model's decoder adapter (docs/adapters.md). The decoder layers are called
as ``layer(hidden_states, attention_mask=..., position_embeddings=(cos, sin), position_ids=..., **kwargs)`` by every
supported family in transformers 5.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.profiler import record_function
from transformers import DynamicCache, PreTrainedModel

from skipvision.adapters import SLIDING, DecoderAdapter, adapter_for
from skipvision.inference.kv import Removal, drop_cache_positions, keep_last, kv_cache_bytes, prune_mask, stored_lengths
from skipvision.skip.policies.fastv import check_fastv


@dataclass
class FastVPrefill:
    logits: torch.Tensor  # [B, V] next-token logits at the last prompt position
    removal: Removal  # which of the T prompt positions every cache layer keeps
    kv_bytes_before: int  # the cache's bytes right after the forward, before layers < K are trimmed


def last_token_attention(
    adapter: DecoderAdapter,
    layer: nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    attention_mask: torch.Tensor,
) -> torch.Tensor:
    """Attention [B, T] of the last position's query over all T keys in decoder ``layer``, averaged over heads.

    ``hidden_states`` [B, T, D] is the layer's input, ``position_embeddings`` its (cos, sin) [B or 1, T, hd] and
    ``attention_mask`` [B, T] the 2-D padding mask (the last query sees every earlier key, so causality adds
    nothing; the last position is always inside its own window). Computes exactly what the layer's attention
    computes for that one query (norm, projections, q/k norms, RoPE, scaling and soft-capping, softmax in float32,
    GQA) at O(T) cost instead of the O(T^2) matrix.
    """
    attn = layer.self_attn
    x = adapter.attention_norm(layer)(hidden_states)  # [B, T, D]
    query, key = adapter.query_key(attn, x)  # [B, H, T, hd], [B, H_kv, T, hd]
    query = query[:, :, -1:]  # [B, H, 1, hd]
    cos, sin = position_embeddings  # [B or 1, T, hd]
    query = adapter.rotary(query, query, cos[:, -1:], sin[:, -1:])[0]  # [B, H, 1, hd]
    key = adapter.rotary(key, key, cos, sin)[1]  # [B, H_kv, T, hd]
    # GQA: query head h reads kv head h // G, as transformers' repeat_kv, without repeating the keys.
    query = query.reshape(x.shape[0], key.shape[1], -1, query.shape[-1])  # [B, H_kv, G, hd]
    scores = adapter.scores(attn, query, key)  # [B, H_kv, G, T]
    hidden = ~attention_mask.bool().to(scores.device)[:, None, None, :]  # [B, 1, 1, T]
    weights = scores.float().masked_fill(hidden, float("-inf")).softmax(dim=-1)  # [B, H_kv, G, T]
    return weights.mean(dim=(1, 2))  # [B, T]


def lowest_scored(scores: torch.Tensor, candidates: torch.Tensor, ratio: float) -> torch.Tensor:
    """[B, T] bool: per row the ``floor(ratio * candidates)`` candidate positions with the lowest ``scores`` [B, T]
    (ties: the earlier position); ``candidates`` [B, T] bool."""
    num_drop = (candidates.sum(-1).double() * ratio).floor().long()  # [B]
    order = scores.float().masked_fill(~candidates, float("inf")).argsort(dim=-1, stable=True)  # [B, T]
    steps = torch.arange(scores.shape[1], device=scores.device).expand_as(order)  # [B, T]
    rank = torch.empty_like(order).scatter_(1, order, steps)  # [B, T], 0 = lowest-scored candidate
    return rank < num_drop[:, None]


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x`` [B or 1, T, C] at ``index`` [B, T'] along T -> [B, T', C]."""
    x = x.expand(index.shape[0], -1, -1)  # [B, T, C]
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


class _Pruner:
    """The state shared by the pre-hooks of one FastV prefill (see the module docstring)."""

    def __init__(
        self, adapter: DecoderAdapter, attention_mask: torch.Tensor, image_slots: torch.Tensor, ratio: float
    ) -> None:
        self.adapter = adapter
        self.mask = attention_mask  # [B, T]
        self.candidates = image_slots.bool() & attention_mask.bool()  # [B, T]
        self.ratio = ratio
        self.removal: Removal | None = None
        self.positions: torch.Tensor | None = None  # [B, T'] the survivors' true positions
        self.masks: dict[str, Any] = {}  # layer type -> the reduced sequence's mask

    def score(self, layer: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        """Pre-hook of layer K - 1: plan the removal from the last token's attention row."""
        with record_function("skipvision::fastv_score"):
            scores = last_token_attention(self.adapter, layer, args[0], kwargs["position_embeddings"], self.mask)
            self.removal = Removal.plan(~lowest_scored(scores, self.candidates.to(scores.device), self.ratio))

    def prune(self, layer: nn.Module, args: tuple, kwargs: dict[str, Any], layer_index: int, first: bool) -> tuple:
        """Pre-hook of layers K..L-1: layer K (``first``) gathers the hidden states to the survivors and builds the
        reduced positions and masks; every such layer gets them, with the mask of its layer type and its own
        (cos, sin) gathered (Gemma 3's local and global layers rotate differently)."""
        if first:
            with record_function("skipvision::fastv_prune"):
                args = self._reduce(args, kwargs)
        index = self.removal.index.to(args[0].device)  # [B, T']
        cos, sin = kwargs["position_embeddings"]  # [B or 1, T, hd]
        return args, {
            **kwargs,
            "attention_mask": self.masks[self.adapter.layer_types[layer_index]],
            "position_embeddings": (_gather(cos, index), _gather(sin, index)),  # [B, T', hd] each
            "position_ids": self.positions,
        }

    def _reduce(self, args: tuple, kwargs: dict[str, Any]) -> tuple:
        """Gather layer K's input to the survivors; the survivors' true positions and masks per layer type."""
        hidden = args[0]  # [B, T, D]
        index = self.removal.index.to(hidden.device)  # [B, T']
        hidden = _gather(hidden, index)  # [B, T', D]
        self.positions = kwargs["position_ids"].expand(index.shape[0], -1).gather(1, index)  # [B, T'], true
        valid = prune_mask(self.mask, self.removal).to(hidden.device)  # [B, T'], fillers 0
        self.masks = self.adapter.type_masks(hidden, self.positions, self.positions, valid)
        return (hidden, *args[1:])


def _check_inputs(
    backbone: PreTrainedModel,
    embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    image_slots: torch.Tensor,
    cache: DynamicCache,
    layer: int,
    ratio: float,
) -> None:
    check_fastv(layer, ratio)
    num_layers = len(adapter_for(backbone.config).layers(backbone))
    if layer >= num_layers:
        raise ValueError(
            f"fastv: layer (K) must be in [1, {num_layers - 1}] for this {num_layers}-layer backbone, got {layer}"
        )
    shape = tuple(embeds.shape[:2])
    named = {"attention_mask": attention_mask, "position_ids": position_ids, "image_slots": image_slots}
    for name, tensor in named.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(f"fastv: {name} must be [B, T] = {list(shape)}, got {list(tensor.shape)}")
    if not bool(attention_mask[:, -1].bool().all()):
        raise ValueError("fastv: prompts must be left-padded; the last position's query scores the image tokens")
    if bool((image_slots.bool() & attention_mask.bool())[:, -1].any()):
        raise ValueError("fastv: the last prompt position is an image slot; its query scores the image tokens")
    if cache.get_seq_length() > 0:
        raise ValueError("fastv: the prefill covers the whole prompt; the cache must be empty")


@torch.no_grad()
def fastv_prefill(
    backbone: PreTrainedModel,
    embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    image_slots: torch.Tensor,
    cache: DynamicCache,
    layer: int,
    ratio: float,
) -> FastVPrefill:
    """Prefill with FastV: one forward of ``backbone`` (an HF causal LM) into the empty ``cache``.

    ``embeds`` [B, T, D] (left-padded prompts with the image slots filled), ``attention_mask`` [B, T] (1 = real
    token), ``position_ids`` [B, T] (true positions), ``image_slots`` [B, T] bool; ``layer`` K in [1, L - 1] and
    ``ratio`` in (0, 1) as :class:`~skipvision.skip.policies.fastv.FastV`. Afterwards every cache layer holds the
    positions ``removal.index`` ([B, H_kv, T - min drops, hd]); decode with ``prune_mask(attention_mask, removal)``
    extended by ones and explicit true positions.
    """
    _check_inputs(backbone, embeds, attention_mask, position_ids, image_slots, cache, layer, ratio)
    adapter = adapter_for(backbone.config)
    layers = adapter.layers(backbone)
    pruner = _Pruner(adapter, attention_mask, image_slots, ratio)
    handles = []
    try:
        handles.append(layers[layer - 1].register_forward_pre_hook(pruner.score, with_kwargs=True))
        for i in range(layer, len(layers)):
            hook = partial(pruner.prune, layer_index=i, first=i == layer)
            handles.append(layers[i].register_forward_pre_hook(hook, with_kwargs=True))
        out = backbone(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
    finally:
        for handle in handles:
            handle.remove()
    kv_bytes = kv_cache_bytes(cache)
    drop_cache_positions(cache, pruner.removal, layers=range(layer))
    sliding = adapter.layers_of(SLIDING)
    if sliding:  # layers >= K may hold older (out-of-window) survivors than the trimmed layers < K
        shortest = min(cache.layers[i].keys.shape[2] for i in sliding)
        keep_last(cache, sliding, shortest)
    stored_lengths(cache, adapter.layer_types)  # every layer of a type now holds the same columns
    return FastVPrefill(out.logits[:, -1], pruner.removal, kv_bytes)
