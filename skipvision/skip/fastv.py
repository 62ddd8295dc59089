"""FastV inside one forward of the unmodified transformers model (docs/method.md "Peers").

FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", ECCV 2024) is training-free: at layer K the share
``ratio`` of image tokens that the last prompt token attends to least in layer K - 1 is dropped, so layers K..L-1
never see them. Here they also leave the KV cache of every layer, so decoding runs over the same reduced prompt
(docs/method.md "KV removal"). FastV is one stage of the multi-stage dropper (skipvision/skip/dropping.py), run in
one prefill forward with forward pre-hooks on the decoder layers:

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

import torch
from transformers import DynamicCache, PreTrainedModel

from skipvision.skip.dropping import (
    DroppedPrefill,
    dropped_prefill,
    last_token_attention,
    lowest_scored,
    policy_stages,
)
from skipvision.skip.policies.base import DropStage
from skipvision.skip.policies.fastv import check_fastv

__all__ = ["fastv_prefill", "last_token_attention", "lowest_scored"]


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
) -> DroppedPrefill:
    """Prefill with FastV: one forward of ``backbone`` (an HF causal LM) into the empty ``cache``.

    ``embeds`` [B, T, D] (left-padded prompts with the image slots filled), ``attention_mask`` [B, T] (1 = real
    token), ``position_ids`` [B, T] (true positions), ``image_slots`` [B, T] bool; ``layer`` K in [1, L - 1] and
    ``ratio`` in (0, 1) as :class:`~skipvision.skip.policies.fastv.FastV`. Afterwards every cache layer holds the
    positions ``removal.index`` ([B, H_kv, T - min drops, hd]); decode with ``prune_mask(attention_mask, removal)``
    extended by ones and explicit true positions.
    """
    check_fastv(layer, ratio)
    stages = policy_stages([DropStage(layer, ratio)])
    return dropped_prefill(backbone, embeds, attention_mask, position_ids, image_slots, cache, stages, label="fastv")
