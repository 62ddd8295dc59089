"""FastV inside one forward of the unmodified transformers model (METHOD.md section 6, peer "FastV").

FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", ECCV 2024) is training-free: at layer K the share
``ratio`` of image tokens that the last prompt token attends to least in layer K - 1 is dropped, so layers K..L-1
never see them. Here they also leave the KV cache of every layer, so decoding runs over the same reduced prompt
(METHOD.md section 4, steps 2-3). One prefill forward, with forward pre-hooks on the decoder layers:

* layer K - 1: from the layer's input hidden states, compute only the attention row the method needs, the last
  prompt token's query against all T keys, heads averaged (:func:`last_token_attention`; never the full attention
  matrix, so any attention implementation runs the forward). Per row the ``floor(ratio * image slots)``
  lowest-scored image positions are dropped and :class:`~skipvision.inference.kv.Removal` plans the survivors (rows
  that drop fewer, e.g. text-only ones, keep masked fillers, exactly like left padding).
* layer K: the hidden states are gathered to the survivors; layers K..L-1 get reduced kwargs: the attention mask
  rebuilt by transformers' own builder from the pruned 2-D mask (fillers 0), and the gathered cos/sin and position
  ids. Positions are the true ones, never recomputed, so RoPE phases stay those of the full sequence.
* after the forward, layers < K (which cached all T positions) are trimmed to the survivors, so every cache layer
  holds the same positions; decode with the pruned 2-D mask and explicit true positions.

transformers 5.24 internals this relies on: the decoder layers are called as ``layer(hidden_states,
attention_mask=<4-D mask built once by masking_utils.create_causal_mask>, position_embeddings=(cos, sin),
position_ids=..., cache=..., use_cache=..., **kwargs)``; the attention module has ``q_proj``/``k_proj`` (optionally
``q_norm``/``k_norm`` over the head dim), ``head_dim`` and ``scaling``, and its modeling module defines
``apply_rotary_pos_emb(q, k, cos, sin)``. Sliding-window layers are rejected (their mask and cache differ).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.profiler import record_function
from transformers import DynamicCache, PreTrainedConfig, PreTrainedModel
from transformers.masking_utils import create_causal_mask

from skipvision.inference.kv import Removal, drop_cache_positions, kv_cache_bytes, prune_mask
from skipvision.skip.ffn import decoder_layers
from skipvision.skip.policies.fastv import check_fastv


@dataclass
class FastVPrefill:
    logits: torch.Tensor  # [B, V] next-token logits at the last prompt position
    removal: Removal  # which of the T prompt positions every cache layer keeps
    kv_bytes_before: int  # the cache's bytes right after the forward, before layers < K are trimmed


def last_token_attention(
    layer: nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    attention_mask: torch.Tensor,
) -> torch.Tensor:
    """Attention [B, T] of the last position's query over all T keys in decoder ``layer``, averaged over heads.

    ``hidden_states`` [B, T, D] is the layer's input, ``position_embeddings`` its (cos, sin) [B or 1, T, hd] and
    ``attention_mask`` [B, T] the 2-D padding mask (the last query sees every earlier key, so causality adds
    nothing). Computes exactly what the layer's attention computes for that one query (norm, projections, RoPE,
    scaled softmax in float32, GQA) at O(T) cost instead of the O(T^2) matrix.
    """
    attn, head_dim = layer.self_attn, layer.self_attn.head_dim
    x = layer.input_layernorm(hidden_states)  # [B, T, D]
    query = _heads(attn.q_proj, getattr(attn, "q_norm", None), x[:, -1:], head_dim)  # [B, H, 1, hd]
    key = _heads(attn.k_proj, getattr(attn, "k_norm", None), x, head_dim)  # [B, H_kv, T, hd]
    rotary = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    cos, sin = position_embeddings  # [B or 1, T, hd]
    query = rotary(query, query, cos[:, -1:], sin[:, -1:])[0]  # [B, H, 1, hd]
    key = rotary(key, key, cos, sin)[1]  # [B, H_kv, T, hd]
    # GQA: query head h reads kv head h // G, as transformers' repeat_kv, without repeating the keys.
    query = query.reshape(x.shape[0], key.shape[1], -1, head_dim)  # [B, H_kv, G, hd]
    scores = torch.matmul(query, key.transpose(-1, -2)) * attn.scaling  # [B, H_kv, G, T]
    hidden = ~attention_mask.bool().to(scores.device)[:, None, None, :]  # [B, 1, 1, T]
    weights = scores.float().masked_fill(hidden, float("-inf")).softmax(dim=-1)  # [B, H_kv, G, T]
    return weights.mean(dim=(1, 2))  # [B, T]


def _heads(proj: nn.Module, norm: nn.Module | None, x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``x`` [B, t, D] -> [B, heads, t, hd] as the attention module projects it, with its optional q/k norm either
    per head (Qwen3, Gemma3) or over the whole projection (OLMo2), told apart by the norm's width."""
    y = proj(x)  # [B, t, heads * hd]
    whole = norm is not None and norm.weight.shape[-1] == y.shape[-1] != head_dim
    y = (norm(y) if whole else y).view(*x.shape[:2], -1, head_dim)  # [B, t, heads, hd]
    if norm is not None and not whole:
        y = norm(y)
    return y.transpose(1, 2)  # [B, heads, t, hd]


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
        self, config: PreTrainedConfig, attention_mask: torch.Tensor, image_slots: torch.Tensor, ratio: float
    ) -> None:
        self.config = config
        self.mask = attention_mask  # [B, T]
        self.candidates = image_slots.bool() & attention_mask.bool()  # [B, T]
        self.ratio = ratio
        self.removal: Removal | None = None
        self.reduced: dict[str, Any] = {}  # the kwargs of layers K..L-1

    def score(self, layer: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        """Pre-hook of layer K - 1: plan the removal from the last token's attention row."""
        with record_function("skipvision::fastv_score"):
            scores = last_token_attention(layer, args[0], kwargs["position_embeddings"], self.mask)  # [B, T]
            self.removal = Removal.plan(~lowest_scored(scores, self.candidates.to(scores.device), self.ratio))

    def prune(self, layer: nn.Module, args: tuple, kwargs: dict[str, Any], first: bool) -> tuple[tuple, dict]:
        """Pre-hook of layers K..L-1: layer K (``first``) gathers the hidden states to the survivors and builds the
        reduced kwargs; every such layer gets them."""
        if first:
            with record_function("skipvision::fastv_prune"):
                args = self._reduce(args, kwargs)
        return args, {**kwargs, **self.reduced}

    def _reduce(self, args: tuple, kwargs: dict[str, Any]) -> tuple:
        """Gather layer K's input to the survivors and build the reduced kwargs of layers K..L-1."""
        hidden = args[0]  # [B, T, D]
        index = self.removal.index.to(hidden.device)  # [B, T']
        hidden = _gather(hidden, index)  # [B, T', D]
        positions = kwargs["position_ids"].expand(index.shape[0], -1).gather(1, index)  # [B, T'], true positions
        cos, sin = kwargs["position_embeddings"]  # [B or 1, T, hd]
        self.reduced = {
            "attention_mask": create_causal_mask(
                config=self.config,
                inputs_embeds=hidden,
                attention_mask=prune_mask(self.mask, self.removal).to(hidden.device),  # [B, T'], fillers 0
                cache=None,  # mask sizes from the reduced sequence itself, not from the half-filled cache
                position_ids=positions,
            ),
            "position_embeddings": (_gather(cos, index), _gather(sin, index)),  # [B, T', hd] each
            "position_ids": positions,
        }
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
    num_layers = len(decoder_layers(backbone))
    if layer >= num_layers:
        raise ValueError(
            f"fastv: layer (K) must be in [1, {num_layers - 1}] for this {num_layers}-layer backbone, got {layer}"
        )
    config = backbone.config
    types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    sliding = window is not None if types is None else any(kind != "full_attention" for kind in types)
    if sliding:
        raise NotImplementedError(
            f"fastv: only full-attention decoders are supported (layer_types={types}, sliding_window={window})"
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
    layers = decoder_layers(backbone)
    pruner = _Pruner(backbone.config, attention_mask, image_slots, ratio)
    handles = []
    try:
        handles.append(layers[layer - 1].register_forward_pre_hook(pruner.score, with_kwargs=True))
        for i in range(layer, len(layers)):
            hook = partial(pruner.prune, first=i == layer)
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
    return FastVPrefill(out.logits[:, -1], pruner.removal, kv_bytes)
