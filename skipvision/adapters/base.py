"""What skipvision needs to know of one family of HF decoders, in one place (docs/adapters.md).

Skip-FFN, FastV, the masking ablation and KV removal never reach into transformers' modeling code themselves: they
ask the model's :class:`DecoderAdapter` for the decoder layers, a layer's MLP and attention-input norm, the query
and key projections and RoPE of its attention, the layer types (full or sliding-window attention) and how attention
masks and cache positions are laid out for each type. The base class describes the Llama layout, which most
families share; a family that differs overrides only what differs (see :mod:`skipvision.adapters.families`).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import PreTrainedConfig
from transformers.cache_utils import get_layer_types_and_kwargs

from skipvision.adapters.masks import position_mask

FULL = "full_attention"
SLIDING = "sliding_attention"


class DecoderAdapter:
    """A decoder family's internals, as Skip-FFN, FastV, the masking ablation and KV removal use them.

    Built for one model config (its layer types and window); :func:`skipvision.adapters.adapter_for` picks the
    family's subclass from ``config.model_type``. Subclasses set ``model_types`` (the HF ``model_type`` values they
    serve), ``modeling`` (the transformers module whose ``apply_rotary_pos_emb`` the family uses),
    ``takes_mask_mapping`` (its forward accepts one mask per layer type, so it may mix full and sliding layers) and
    ``tiny_config`` (a download-free config the test suite builds every family from).
    """

    model_types: ClassVar[tuple[str, ...]] = ()
    modeling: ClassVar[str] = ""
    takes_mask_mapping: ClassVar[bool] = False
    tiny_config: ClassVar[dict[str, Any]] = {}

    def __init__(self, config: PreTrainedConfig) -> None:
        self.config = config
        types, _ = get_layer_types_and_kwargs(config)
        unknown = sorted(set(types) - {FULL, SLIDING})
        if unknown:
            raise NotImplementedError(f"{config.model_type}: attention layer types {unknown} are not supported")
        self.layer_types: tuple[str, ...] = tuple(types)
        window = getattr(config, "sliding_window", None)
        self.sliding_window: int | None = int(window) if SLIDING in self.layer_types else None
        if len(set(types)) > 1 and not self.takes_mask_mapping:
            raise NotImplementedError(f"{config.model_type}: mixed layer types {sorted(set(types))} are not supported")

    # Structure of the model -----------------------------------------------------------------------------------

    def layers(self, model: nn.Module) -> nn.ModuleList:
        """The decoder layer list of the causal LM (``model.model.layers``) or of its base model (``model.layers``)."""
        for owner in (model, getattr(model, "model", None)):
            layers = getattr(owner, "layers", None)
            if isinstance(layers, nn.ModuleList):
                return layers
        raise TypeError(f"{type(model).__name__} has no decoder layer list at `.model.layers` or `.layers`")

    def mlp(self, layer: nn.Module) -> nn.Module:
        """The layer's FFN: the module whose output is added to the residual (zeros = the FFN is skipped)."""
        return layer.mlp

    def attention_norm(self, layer: nn.Module) -> nn.Module:
        """The norm applied to the layer's input before the attention projections."""
        return layer.input_layernorm

    # The attention computation (one query row, for FastV) ----------------------------------------------------

    def query_key(self, attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries [B, H, t, hd] and keys [B, H_kv, t, hd] of ``x`` [B, t, D] as the attention module computes them
        before RoPE (with the family's q/k norms)."""
        return self._heads(attn.q_proj(x), attn.head_dim), self._heads(attn.k_proj(x), attn.head_dim)

    def rotary(
        self, query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE as the family applies it: query [B, H, t, hd], key [B, H_kv, t', hd], cos/sin [B or 1, t, hd]
        (pass query and key separately when their lengths differ: each comes back rotated by its own cos/sin)."""
        return importlib.import_module(self.modeling).apply_rotary_pos_emb(query, key, cos, sin)

    @staticmethod
    def _heads(y: torch.Tensor, head_dim: int) -> torch.Tensor:
        """[B, t, heads * hd] -> [B, heads, t, hd]."""
        return y.view(*y.shape[:2], -1, head_dim).transpose(1, 2)

    def scores(self, attn: nn.Module, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """Pre-softmax attention scores [B, H_kv, G, t] of grouped queries [B, H_kv, G, hd] against keys
        [B, H_kv, t, hd]: the family's scaling (and soft-capping, where it has one)."""
        return torch.matmul(query, key.transpose(-1, -2)) * attn.scaling

    # Attention layout per layer type ---------------------------------------------------------------------------

    @property
    def types(self) -> tuple[str, ...]:
        """The distinct layer types, full attention first."""
        return tuple(kind for kind in (FULL, SLIDING) if kind in self.layer_types)

    def window(self, kind: str) -> int | None:
        """The attention window of a layer type (None: full attention)."""
        return self.sliding_window if kind == SLIDING else None

    def type_masks(
        self,
        embeds: torch.Tensor,
        query_positions: torch.Tensor,
        key_positions: torch.Tensor,
        key_valid: torch.Tensor,
        key_lengths: dict[str, int] | None = None,
    ) -> dict[str, Any]:
        """One mask per layer type for a forward whose queries sit at ``query_positions`` [B, q] and whose keys are
        the columns ``key_positions``/``key_valid`` [B, k] (true positions; False = padding or filler).

        A query sees the valid keys at or before its position, within the window for sliding layers. Layers of a
        type that cache only the last n columns (sliding windows) get the last ``key_lengths[type]`` columns.
        ``embeds`` [B, q, D] gives the masks' dtype and device.
        """
        built = {}
        for kind in self.types:
            width = (key_lengths or {}).get(kind, key_positions.shape[1])
            built[kind] = position_mask(
                self.config,
                embeds,
                query_positions,
                key_positions[:, -width:],
                key_valid[:, -width:],
                self.window(kind),
            )
        return built

    def masks(
        self,
        embeds: torch.Tensor,
        query_positions: torch.Tensor,
        key_positions: torch.Tensor,
        key_valid: torch.Tensor,
        key_lengths: dict[str, int] | None = None,
    ) -> torch.Tensor | dict[str, Any]:
        """:meth:`type_masks` as the decoder's ``attention_mask`` argument (see :meth:`pack`)."""
        return self.pack(self.type_masks(embeds, query_positions, key_positions, key_valid, key_lengths))

    def pack(self, masks: dict[str, Any]) -> torch.Tensor | dict[str, Any]:
        """One mask per layer type -> the decoder's ``attention_mask`` argument: the mask itself when there is one
        type, else the mapping (Qwen2, Qwen3, Gemma2 and Gemma3 take a mapping from layer type to mask)."""
        if len(masks) == 1:
            return next(iter(masks.values()))
        return masks

    def layers_of(self, kind: str) -> Sequence[int]:
        """Indices of the decoder layers of one type."""
        return [i for i, t in enumerate(self.layer_types) if t == kind]
