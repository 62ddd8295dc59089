"""In-LLM token dropping at layer boundaries, in training and at prefill (docs/method.md "Peers").

A drop schedule is a list of :class:`Stage` s with increasing layers K_1 < K_2 < ...: at layer K_i the candidates
(image slots) that the stage's rule picks are removed from the sequence, so layers K_i.. never see them. The rule
sees the scores of the current survivors, the query token's attention row in layer K_i - 1 (one row, computed as
the layer computes it, so any attention implementation runs the forward: :func:`last_token_attention`); stage
i + 1 works on stage i's survivors. FastV is one stage (skipvision/skip/fastv.py); PyramidDrop is several.

Within one forward of the unmodified transformers model, :func:`dropping` puts forward pre-hooks on the decoder
layers:

* layer K_i - 1 scores the current sequence and plans the stage's :class:`~skipvision.inference.kv.Removal`
  (survivors in order; a row that drops fewer than another keeps some dropped positions as masked fillers, like
  left padding, so the tensors stay rectangular). Fillers of earlier stages count as dropped again.
* layer K_i gathers the hidden states to the survivors. Every layer >= K_1 gets the survivors' true position ids,
  their (cos, sin) gathered from the full sequence's, and the mask of its layer type built from the true positions
  (fillers masked; :meth:`~skipvision.adapters.DecoderAdapter.type_masks`), so RoPE phases and sliding windows stay
  those of the full sequence and SDPA keeps running.
* after the last layer, the survivors' hidden states are scattered back to [B, T, D] (dropped positions: zeros),
  so the caller's final norm, logits and labels stay aligned with the input. A dropped position t whose next
  label ``labels[:, t + 1]`` is not -100 raises ValueError: its labelled prediction would be lost.

With a cache (prefill), layers < K_1 cache all T positions and layers in [K_i, K_i+1) stage i's survivors;
:func:`trim_cache` then cuts every layer to the final survivors (docs/method.md "KV removal"). Without one, the
forward is differentiable end to end (training). Gradient checkpointing is refused: its recomputation would run
the hooks again and compose the drops twice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from itertools import pairwise
from typing import Any

import torch
from torch import nn
from torch.profiler import record_function
from transformers import DynamicCache, PreTrainedModel

from skipvision.adapters import SLIDING, DecoderAdapter, adapter_for
from skipvision.data.chat import IGNORE_INDEX
from skipvision.inference.kv import Removal, drop_cache_positions, keep_last, kv_cache_bytes, prune_mask, stored_lengths
from skipvision.skip.layout import DropStage

# (scores [B, T'] of the current survivors, candidates [B, T'] bool) -> which to drop [B, T'] bool
DropRule = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Stage:
    """One boundary: ``layer`` K is the first decoder layer without the positions ``rule`` drops."""

    layer: int
    rule: DropRule


def policy_stages(stages: Sequence[DropStage]) -> list[Stage]:
    """A policy's :meth:`~skipvision.skip.policies.base.SkipPolicy.drop_stages` as dropper stages, each with FastV's
    rule at its ratio (:func:`lowest_scored`)."""
    return [Stage(stage.layer, partial(lowest_scored, ratio=stage.ratio)) for stage in stages]


@dataclass
class DroppedPrefill:
    """What :func:`dropped_prefill` returns besides the filled cache."""

    logits: torch.Tensor  # [B, V] next-token logits at the last prompt position
    removal: Removal  # which of the T prompt positions every cache layer keeps
    kv_bytes_before: int  # the cache's bytes right after the forward, before the cache is trimmed


def last_token_attention(
    adapter: DecoderAdapter,
    layer: nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    attention_mask: torch.Tensor,
    query_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention [B, T] of one query per row over the T keys in decoder ``layer``, averaged over heads.

    ``hidden_states`` [B, T, D] is the layer's input, ``position_embeddings`` its (cos, sin) [B or 1, T, hd],
    ``attention_mask`` [B, T] the 2-D padding mask and ``query_index`` [B] each row's query position (default: the
    last; keys after it are hidden, so causality holds). Computes exactly what the layer's attention computes for
    that one query (norm, projections, q/k norms, RoPE, scaling and soft-capping, softmax in float32, GQA) at O(T)
    cost instead of the O(T^2) matrix.
    """
    attn = layer.self_attn
    batch, length = hidden_states.shape[:2]
    if query_index is None:
        query_index = torch.full((batch,), length - 1, device=hidden_states.device)
    query_index = query_index.to(hidden_states.device)[:, None]  # [B, 1]
    x = adapter.attention_norm(layer)(hidden_states)  # [B, T, D]
    query, key = adapter.query_key(attn, x)  # [B, H, T, hd], [B, H_kv, T, hd]
    query = query.gather(2, query_index[:, None, :, None].expand(-1, query.shape[1], 1, query.shape[-1]))  # [B,H,1,hd]
    cos, sin = position_embeddings  # [B or 1, T, hd]
    query = adapter.rotary(query, query, gather(cos, query_index), gather(sin, query_index))[0]  # [B, H, 1, hd]
    key = adapter.rotary(key, key, cos, sin)[1]  # [B, H_kv, T, hd]
    # GQA: query head h reads kv head h // G, as transformers' repeat_kv, without repeating the keys.
    query = query.reshape(batch, key.shape[1], -1, query.shape[-1])  # [B, H_kv, G, hd]
    scores = adapter.scores(attn, query, key)  # [B, H_kv, G, T]
    later = torch.arange(length, device=scores.device) > query_index.to(scores.device)  # [B, T]
    hidden = (~attention_mask.bool().to(scores.device) | later)[:, None, None, :]  # [B, 1, 1, T]
    weights = scores.float().masked_fill(hidden, float("-inf")).softmax(dim=-1)  # [B, H_kv, G, T]
    return weights.mean(dim=(1, 2))  # [B, T]


def lowest_scored(scores: torch.Tensor, candidates: torch.Tensor, ratio: float) -> torch.Tensor:
    """[B, T] bool: per row the ``floor(ratio * candidates)`` candidate positions with the lowest ``scores`` [B, T]
    (ties: the earlier position); ``candidates`` [B, T] bool. As a :data:`DropRule`: ``partial(lowest_scored,
    ratio=r)``."""
    num_drop = (candidates.sum(-1).double() * ratio).floor().long()  # [B]
    order = scores.float().masked_fill(~candidates, float("inf")).argsort(dim=-1, stable=True)  # [B, T]
    steps = torch.arange(scores.shape[1], device=scores.device).expand_as(order)  # [B, T]
    rank = torch.empty_like(order).scatter_(1, order, steps)  # [B, T], 0 = lowest-scored candidate
    return rank < num_drop[:, None]


def gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x`` [B or 1, T, C] at ``index`` [B, T'] along T -> [B, T', C]."""
    x = x.expand(index.shape[0], -1, -1)  # [B, T, C]
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


def subset_kwargs(kwargs: dict[str, Any], index: torch.Tensor, positions: torch.Tensor, mask: Any) -> dict[str, Any]:
    """A decoder layer's kwargs for the subset ``index`` [B, T'] of the full sequence's positions: their (cos, sin)
    gathered from the full sequence's, their true ``positions`` [B, T'] and the layer's ``mask`` built from them."""
    cos, sin = kwargs["position_embeddings"]  # [B or 1, T, hd], the full sequence's
    embeddings = (gather(cos, index), gather(sin, index))  # [B, T', hd] each
    return {**kwargs, "attention_mask": mask, "position_embeddings": embeddings, "position_ids": positions}


def compose(first: Removal, then: Removal) -> Removal:
    """``then`` (planned on ``first``'s survivors) in ``first``'s source positions. Fillers of ``first`` are never
    kept by ``then`` (the dropper counts them as dropped), so validity is ``then``'s."""
    return Removal(first.index.gather(1, then.index.to(first.index.device)), then.valid, first.source_length)


class Dropper:
    """The state of one forward's drops (see the module docstring). ``removal``: the final survivors among the T
    input positions; ``plans``: per stage, its survivors among the previous stage's (the first among the T)."""

    def __init__(
        self,
        adapter: DecoderAdapter,
        stages: Sequence[Stage],
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        candidates: torch.Tensor,
        labels: torch.Tensor | None,
        query_index: torch.Tensor | None,
        label: str,
        follow: Callable[[Removal], None] | None = None,
    ) -> None:
        self.adapter = adapter
        self.follow = follow  # told each new composed removal, before the layer that first runs without it
        self.label = label  # names the profiler ranges skipvision::<label>_score and _prune
        self.stages = {stage.layer: stage for stage in stages}
        self.position_ids = position_ids  # [B, T], true positions
        self.labels = labels  # [B, T] or None
        self.mask = attention_mask  # [B, T'] the current sequence's 2-D mask (fillers 0)
        self.candidates = candidates.bool() & attention_mask.bool()  # [B, T']
        self.query = query_index  # [B] the query's index in the current sequence (None: the last)
        self.plans: list[Removal] = []
        self.pending: Removal | None = None  # planned in layer K - 1, applied at layer K
        self.removal: Removal | None = None
        self.positions: torch.Tensor | None = None  # [B, T'] the survivors' true positions
        self.masks: dict[str, Any] = {}  # layer type -> the current sequence's mask

    def pre_hook(self, layer: nn.Module, args: tuple, kwargs: dict[str, Any], layer_index: int) -> tuple:
        """Before decoder layer ``layer_index``: apply a planned drop, hand the layer the reduced kwargs, and plan
        the next stage's drop when layer ``layer_index + 1`` is a boundary."""
        if self.pending is not None:
            with record_function(f"skipvision::{self.label}_prune"):
                args = self._reduce(args, kwargs)
        if self.removal is not None:
            index = self.removal.index.to(args[0].device)  # [B, T']
            mask = self.masks[self.adapter.layer_types[layer_index]]
            kwargs = subset_kwargs(kwargs, index, self.positions, mask)
        stage = self.stages.get(layer_index + 1)
        if stage is not None:
            with record_function(f"skipvision::{self.label}_score"):
                scores = last_token_attention(
                    self.adapter, layer, args[0], kwargs["position_embeddings"], self.mask, self.query
                )
                candidates = self.candidates.to(scores.device)  # [B, T']
                keep = ~(stage.rule(scores, candidates) & candidates)  # [B, T'], only candidates may drop
                if self.plans:
                    keep &= self.plans[-1].valid.to(keep.device)  # an earlier stage's fillers are dropped again
                self.pending = Removal.plan(keep)
                self._check_labels(self.pending)
        return args, kwargs

    def restore(self, _layer: nn.Module, _args: tuple, output: torch.Tensor) -> torch.Tensor:
        """After the last decoder layer: its output [B, T', D] at the survivors -> [B, T, D], zeros elsewhere."""
        index = self.removal.index.to(output.device)[..., None].expand(-1, -1, output.shape[-1])  # [B, T', D]
        full = output.new_zeros(output.shape[0], self.removal.source_length, output.shape[-1])  # [B, T, D]
        return full.scatter(1, index, output)

    def _reduce(self, args: tuple, kwargs: dict[str, Any]) -> tuple:
        """Gather the layer's input to the pending plan's survivors; compose the plan, the survivors' true
        positions, 2-D mask, candidates, query index and masks per layer type."""
        plan, self.pending = self.pending, None
        hidden = gather(args[0], plan.index.to(args[0].device))  # [B, T', D]
        self.removal = plan if self.removal is None else compose(self.removal, plan)
        self.plans.append(plan)
        if self.follow is not None:
            self.follow(self.removal)
        index = self.removal.index.to(hidden.device)  # [B, T'] into the T input positions
        self.positions = self.position_ids.expand(index.shape[0], -1).gather(1, index)  # [B, T'], true
        self.mask = prune_mask(self.mask, plan).to(hidden.device)  # [B, T'], fillers 0
        self.candidates = self.candidates.gather(1, plan.index.to(self.candidates.device))
        self.candidates &= plan.valid.to(self.candidates.device)  # [B, T'], fillers are no candidates
        if self.query is not None:  # the query is never dropped: its new index is its rank among the survivors
            self.query = (plan.index.to(self.query.device) < self.query[:, None]).sum(-1)  # [B]
        self.masks = self.adapter.type_masks(hidden, self.positions, self.positions, self.mask)
        return (hidden, *args[1:])

    def _check_labels(self, plan: Removal) -> None:
        """Raise ValueError if ``plan`` drops a position whose next label is not -100."""
        if self.labels is None:
            return
        composed = plan if self.removal is None else compose(self.removal, plan)
        index = composed.index.to(self.labels.device)
        kept = torch.zeros_like(self.labels, dtype=torch.bool).scatter(1, index, composed.valid.to(index.device))
        lost = ~kept[:, :-1] & (self.labels[:, 1:] != IGNORE_INDEX)  # [B, T - 1]
        if bool(lost.any()):
            rows, cols = lost.nonzero(as_tuple=True)
            raise ValueError(
                f"token dropping: position {int(cols[0])} of row {int(rows[0])} is dropped but the next label is "
                f"{int(self.labels[rows[0], cols[0] + 1])}; only positions followed by -100 (image slots) may drop"
            )


def _check_inputs(
    backbone: PreTrainedModel,
    stages: Sequence[Stage],
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    candidates: torch.Tensor,
    labels: torch.Tensor | None,
    query_index: torch.Tensor | None,
) -> None:
    num_layers = len(adapter_for(backbone.config).layers(backbone))
    layers = [stage.layer for stage in stages]
    for k in layers:
        if not 1 <= k < num_layers:
            raise ValueError(
                f"token dropping: a stage's layer (K) must be in [1, {num_layers - 1}] for this "
                f"{num_layers}-layer backbone, got {k}"
            )
    if not layers or layers != sorted(set(layers)):
        raise ValueError(f"token dropping: stage layers must be strictly increasing and non-empty, got {layers}")
    if torch.is_grad_enabled() and getattr(backbone, "is_activation_checkpointing", False):
        raise ValueError("token dropping: gradient checkpointing would re-run the drop hooks; turn it off")
    shape = tuple(attention_mask.shape)
    named = {"position_ids": position_ids, "candidates": candidates, "labels": labels}
    for name, tensor in named.items():
        if tensor is not None and tuple(tensor.shape) != shape:
            raise ValueError(f"token dropping: {name} must be [B, T] = {list(shape)}, got {list(tensor.shape)}")
    rows = torch.arange(shape[0], device=attention_mask.device)
    query = torch.full_like(rows, shape[1] - 1) if query_index is None else query_index.to(rows.device)
    if not bool(attention_mask[rows, query].bool().all()):
        raise ValueError("token dropping: a query position is padding (prompts must be left-padded for the default)")
    if bool(candidates.to(rows.device).bool()[rows, query].any()):
        where = "the last prompt position" if query_index is None else "a query position"
        raise ValueError(f"token dropping: {where} is an image slot; its query scores the image tokens")


@contextmanager
def dropping(
    backbone: PreTrainedModel,
    stages: Sequence[Stage],
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    candidates: torch.Tensor,
    labels: torch.Tensor | None = None,
    query_index: torch.Tensor | None = None,
    label: str = "drop",
    follow: Callable[[Removal], None] | None = None,
) -> Iterator[Dropper]:
    """Within the block, forwards of ``backbone`` (an HF causal LM) drop tokens by ``stages``; hooks are removed on
    exit, also on error.

    ``attention_mask`` [B, T] (1 = real), ``position_ids`` [B, T] (true positions) and ``candidates`` [B, T] bool
    (the droppable image slots) describe the forward's input; ``labels`` [B, T] (unshifted, -100 = none) guards
    against dropping a labelled prediction; ``query_index`` [B] is each row's scoring token (default: the last
    position, so prompts must be left-padded); ``label`` names the profiler ranges; ``follow`` is told every new
    survivor set (a :class:`Removal` of the T input positions) before the first layer without the dropped ones, so
    per-row state of the caller (the Skip-FFN plan) can follow the sequence. After the forward, ``dropper.removal``
    holds the final survivors.
    """
    _check_inputs(backbone, stages, attention_mask, position_ids, candidates, labels, query_index)
    adapter = adapter_for(backbone.config)
    layers = adapter.layers(backbone)
    dropper = Dropper(adapter, stages, attention_mask, position_ids, candidates, labels, query_index, label, follow)
    handles = [layers[-1].register_forward_hook(dropper.restore)]
    try:
        for i, layer in enumerate(layers):
            handles.append(layer.register_forward_pre_hook(partial(dropper.pre_hook, layer_index=i), with_kwargs=True))
        yield dropper
    finally:
        for handle in handles:
            handle.remove()


def trim_cache(cache: DynamicCache, dropper: Dropper) -> None:
    """After a prefill under :func:`dropping`: cut every cache layer to the final survivors ``dropper.removal``.

    Layers < K_1 cached the T input positions, layers in [K_i, K_i+1) stage i's survivors; each is gathered by the
    composition of the later stages' plans. Sliding layers then keep the same suffix (docs/adapters.md "Caches"):
    columns older than the shortest one's are outside every later query's window.
    """
    bounds = [0, *sorted(dropper.stages)]
    for i, (start, stop) in enumerate(pairwise(bounds)):
        plan = dropper.plans[i]
        for later in dropper.plans[i + 1 :]:
            plan = compose(plan, later)
        drop_cache_positions(cache, plan, layers=range(start, stop))
    adapter = dropper.adapter
    sliding = adapter.layers_of(SLIDING)
    if sliding:
        shortest = min(cache.layers[i].keys.shape[2] for i in sliding)
        keep_last(cache, sliding, shortest)
    stored_lengths(cache, adapter.layer_types)  # every layer of a type now holds the same columns


def dropped_prefill(
    backbone: PreTrainedModel,
    embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    image_slots: torch.Tensor,
    cache: DynamicCache,
    stages: Sequence[Stage],
    label: str = "drop",
) -> DroppedPrefill:
    """Prefill with ``stages``: one forward of ``backbone`` (an HF causal LM) into the empty ``cache``, then
    :func:`trim_cache`.

    ``embeds`` [B, T, D] (left-padded prompts with the image slots filled), ``attention_mask`` [B, T] (1 = real
    token), ``position_ids`` [B, T] (true positions), ``image_slots`` [B, T] bool (the candidates); ``label`` names
    the errors and profiler ranges. Afterwards every cache layer holds the positions ``removal.index``; decode with
    ``prune_mask(attention_mask, removal)`` extended by ones and explicit true positions.
    """
    if tuple(embeds.shape[:2]) != tuple(attention_mask.shape):
        raise ValueError(
            f"{label}: attention_mask must be [B, T] = {list(embeds.shape[:2])}, got {list(attention_mask.shape)}"
        )
    if cache.get_seq_length() > 0:
        raise ValueError(f"{label}: the prefill covers the whole prompt; the cache must be empty")
    with torch.no_grad(), dropping(backbone, stages, attention_mask, position_ids, image_slots, label=label) as dropper:
        out = backbone(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
    kv_bytes = kv_cache_bytes(cache)
    trim_cache(cache, dropper)
    return DroppedPrefill(out.logits[:, -1], dropper.removal, kv_bytes)
