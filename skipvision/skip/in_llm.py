"""A method's steps inside the LLM, for forwards over a whole sequence: training, validation and the prefill
(docs/methods.md "Inside the LLM").

The model asks its method (skipvision/skip/policies/base.py) and runs, within one forward of the unmodified
backbone: the Skip-FFN plan of the slot layout, the method's per-layer routing, and its drop stages on the
multi-stage dropper (skipvision/skip/dropping.py), with the Skip-FFN plan following the survivors of each drop.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import torch
from transformers import DynamicCache

from skipvision.adapters import decoder_layers
from skipvision.inference.kv import Removal, drop_cache_positions, kv_cache_bytes
from skipvision.skip.dropping import Dropper, compose, dropping, policy_stages, trim_cache
from skipvision.skip.ffn import SkipFFN
from skipvision.skip.layout import SlotLayout

if TYPE_CHECKING:
    from skipvision.model import Embedded, VisionLanguageModel


@dataclass
class Prefill:
    """What :func:`prefill` leaves besides the filled cache."""

    logits: torch.Tensor  # [B, V] next-token logits at the last prompt position
    removal: Removal | None  # which prompt positions every cache layer keeps; None: all of them
    kv_bytes: int  # the cache's bytes right after the forward, before any removal
    layer_columns: list[Removal] | None = None  # per decoder layer, the prompt positions its cache holds, when the
    # method's layers ran on different rows (a whole-layer router); then ``removal`` is None


def droppable(visual_slots: torch.Tensor, layout: SlotLayout) -> torch.Tensor:
    """[B, T] bool: the image slots of ``visual_slots`` [B, T] that an in-LLM drop may remove, the layout's
    droppable slots of every image (the slots fill row-major, image after image)."""
    candidates = torch.zeros_like(visual_slots)  # [B, T]
    per_image = layout.drop_candidates(visual_slots.device)  # [K]
    candidates[visual_slots] = per_image.repeat(int(visual_slots.sum()) // layout.slots)
    return candidates


def follow_survivors(skip: SkipFFN, ffn_mask: torch.Tensor, removal: Removal) -> None:
    """After an in-LLM drop: the later layers' Skip-FFN plan is ``ffn_mask`` [B, T] at the survivors ``removal``
    (fillers run no FFN), so it lines up with the sequence's [B, T']."""
    index = removal.index.to(ffn_mask.device)  # [B, T']
    skip.set_plan(ffn_mask.gather(1, index) & removal.valid.to(ffn_mask.device))


@contextlib.contextmanager
def method_steps(
    model: VisionLanguageModel,
    embedded: Embedded,
    attention_mask: torch.Tensor,
    positions: torch.Tensor,
    labels: torch.Tensor | None = None,
    query_index: torch.Tensor | None = None,
) -> Iterator[Dropper | None]:
    """Within the block, forwards of ``model.backbone`` over ``embedded``'s whole sequence run the method's steps:
    the Skip-FFN plan of ``embedded``, the method's routing and its drop stages for ``model.training`` (ranked by the
    ``query_index`` [B] token; None: the last). Yields the dropper, or None without drops. The Skip-FFN plan and the
    routed image slots stay set afterwards, so gradient checkpointing recomputes with them.

    ``attention_mask``/``positions``/``labels`` [B, T] describe the forward's input.
    """
    skip = model.skip_ffn
    if skip is not None:
        skip.set_plan(embedded.ffn_mask)
    policy = model.visual.policy
    stages = model.drop_stages(model.training)
    with contextlib.ExitStack() as stack:
        if policy.routed_layers(len(decoder_layers(model.backbone))):  # also without images: every rank, every router
            slots = embedded.visual_slots
            slots = torch.zeros_like(attention_mask, dtype=torch.bool) if slots is None else slots  # [B, T]
            policy.route(slots, attention_mask, positions)
        dropper = None
        if stages and embedded.visual_slots is not None:
            follow = None if embedded.ffn_mask is None else partial(follow_survivors, skip, embedded.ffn_mask)
            label = type(policy).__name__.lower()  # names errors and profiler ranges
            drops = dropping(
                model.backbone,
                policy_stages(stages),
                attention_mask,
                positions,
                droppable(embedded.visual_slots, model.visual.layout),
                labels,
                query_index,
                label,
                follow,
            )
            dropper = stack.enter_context(drops)
        yield dropper


@torch.no_grad()
def prefill(
    model: VisionLanguageModel,
    embedded: Embedded,
    attention_mask: torch.Tensor,
    positions: torch.Tensor,
    cache: DynamicCache,
    drop_kv: bool = True,
) -> Prefill:
    """The training forward over left-padded prompts into the empty ``cache`` (docs/method.md "KV removal"),
    logits at the last position only. In-LLM drops leave every cache layer with the survivors; with ``drop_kv``,
    the skipped slots S among them leave it too. The Skip-FFN plan and the routing are cleared afterwards, so decode
    steps run the plain MLP."""
    try:
        with method_steps(model, embedded, attention_mask, positions) as dropper:
            out = model.run_backbone(embedded, attention_mask, positions, cache, logits_to_keep=1)
        columns = model.visual.policy.layer_columns()
    finally:
        if model.skip_ffn is not None:
            model.skip_ffn.set_plan(None)
        model.visual.policy.route(None)
    kv_bytes = kv_cache_bytes(cache)
    removal = None
    if dropper is not None:
        trim_cache(cache, dropper)
        removal = dropper.removal
    if drop_kv and embedded.ffn_mask is not None:
        keep = embedded.ffn_mask  # [B, T]: text, R and both summaries stay; S goes
        if removal is not None:
            keep = keep.gather(1, removal.index.to(keep.device)) & removal.valid.to(keep.device)  # [B, T']
        skipped = Removal.plan(keep)
        drop_cache_positions(cache, skipped)
        removal = skipped if removal is None else compose(removal, skipped)
    return Prefill(out.logits[:, -1], removal, kv_bytes, columns)
