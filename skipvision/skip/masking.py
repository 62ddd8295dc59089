"""Masking ablation: text queries do not attend to the skipped visual tokens S (docs/method.md "Masking ablation").

The paper's final choice lets text attend to S during training and prefill. Its ablation masks text -> S attention
in training to imitate the inference-time removal of the skipped K/V (docs/method.md "KV removal"): every text
token after an image cannot see that image's S slots, while the visual slot tokens (R, s_R, S, s_S) keep attending
causally to everything before them (s_S still reads every S token), and causality and padding stay as they are.

How transformers 5.24 takes the mask: the decoders (Llama, Qwen2, Mistral, ...) call
``masking_utils.create_causal_mask`` (or ``create_sliding_window_causal_mask``) on the ``attention_mask`` they are
given. A 2-D padding mask becomes the attention implementation's own 4-D format there (sdpa: bool, True = attend;
eager: additive float, 0 or ``finfo(dtype).min``; flex: a ``BlockMask``), while a 4-D mask is returned as-is. The
models' ``forward`` does not take the builder's ``and_mask_function``, so :func:`text_to_skipped_mask` calls the
library's builder itself with ``and_mask_function`` = the text -> S restriction (the supported way to overlay a
pattern on causal + padding) and the resulting 4-D mask is what the backbone gets: one per layer type (full and
sliding window, each from its own builder), packed by the decoder adapter into the form the family's forward takes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers import PreTrainedConfig
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from skipvision.adapters import SLIDING, adapter_for
from skipvision.errors import UnsupportedModelError

MaskFunction = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def text_to_skipped_mask_function(
    ffn_mask: torch.Tensor, visual_slots: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> MaskFunction:
    """The restriction as a transformers mask function ``(batch, head, q, kv) -> bool`` (True = may attend).

    ``ffn_mask`` [B, T] bool, False at the skipped slots S; ``visual_slots`` [B, T] bool, True at every image slot
    (R, s_R, S, s_S); ``attention_mask`` [B, T] (1 = real token) keeps padding queries unrestricted. A query is
    blocked from a key only when the query is a real text token and the key is an S slot; causality and padding
    come from the builder it is combined with. Index-based, so it works with and without ``torch.vmap``.
    """
    text = ~visual_slots.bool()  # [B, T] queries the restriction applies to
    if attention_mask is not None:
        text = text & attention_mask.bool()
    skipped = ~ffn_mask.bool()  # [B, T] keys no text query may read

    def allowed(batch_idx: torch.Tensor, head_idx: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor):
        return ~(text[batch_idx, q_idx] & skipped[batch_idx, kv_idx])

    return allowed


def text_to_skipped_mask(
    config: PreTrainedConfig,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    ffn_mask: torch.Tensor,
    visual_slots: torch.Tensor,
    cache: Any = None,
) -> Any:
    """The backbone's attention mask: causal (windowed for sliding layers) & padding & not(text query -> S key).

    ``inputs_embeds`` [B, T, D] (batch, length, dtype and device of the mask); ``attention_mask`` [B, T] 1 = real
    token; ``position_ids`` [B, T]; ``ffn_mask`` and ``visual_slots`` [B, T] bool as in
    :func:`text_to_skipped_mask_function`. Returns what the library's builder returns for
    ``config._attn_implementation``: sdpa a bool [B, 1, T, T] (True = attend), eager a float [B, 1, T, T]
    (0 or ``finfo(dtype).min``), flex attention a ``BlockMask``; a mapping from layer type to such a mask for
    hybrid decoders (Gemma 2/3). Pass it as the backbone's ``attention_mask``.
    The whole sequence must be in this call (training, or a prefill into an empty cache).
    """
    if cache is not None and cache.get_seq_length() > 0:
        raise ValueError("mask_text_to_skipped: the mask covers a whole sequence; the cache must be empty")
    adapter = adapter_for(config)
    restriction = text_to_skipped_mask_function(ffn_mask, visual_slots, attention_mask)
    masks = {}
    for kind in adapter.types:
        build = create_sliding_window_causal_mask if kind == SLIDING else create_causal_mask
        mask = build(
            config=config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
            and_mask_function=restriction,
        )
        if mask is None or (isinstance(mask, torch.Tensor) and mask.dim() != 4):
            raise UnsupportedModelError(
                f"mask_text_to_skipped: attention implementation {config._attn_implementation!r} takes no custom "
                "4-D mask; use sdpa, eager or flex_attention"
            )
        masks[kind] = mask
    return adapter.pack(masks)
