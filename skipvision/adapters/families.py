"""The supported decoder families: one adapter each (docs/adapters.md "Supported families").

Each class states only how its family differs from the Llama layout of :class:`DecoderAdapter`, and a tiny
download-free configuration the test suite builds it from (tests/families.py lists the families under test).
"""

from __future__ import annotations

import torch
from torch import nn

from skipvision.adapters.base import DecoderAdapter
from skipvision.adapters.registry import register_adapter

# d=64, f=176, 3 layers, 4 heads of 16, 2 KV heads: small enough for CPU tests, deep enough for FastV at layer 1-2.
_TINY = {
    "hidden_size": 64,
    "intermediate_size": 176,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 512,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}
# Hybrid families get a window shorter than the tests' prompts, so removal from trimmed sliding layers is exercised.
_HYBRID = {"sliding_window": 8, "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]}


def _tiny(model_type: str, **extra: object) -> dict[str, object]:
    """A family's tiny config: the shared sizes, its ``model_type`` and its own extras."""
    return {"model_type": model_type, **_TINY, **extra}


class _PerHeadQKNorm(DecoderAdapter):
    """Queries and keys are RMS-normalised per head before RoPE (``q_norm``/``k_norm`` over ``head_dim``)."""

    def query_key(self, attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hd = attn.head_dim
        query = attn.q_norm(attn.q_proj(x).view(*x.shape[:2], -1, hd)).transpose(1, 2)  # [B, H, t, hd]
        key = attn.k_norm(attn.k_proj(x).view(*x.shape[:2], -1, hd)).transpose(1, 2)  # [B, H_kv, t, hd]
        return query, key


class _SoftCapped(DecoderAdapter):
    """Attention logits are soft-capped: ``cap * tanh(scores / cap)`` after scaling (Gemma 2 and 3)."""

    def scores(self, attn: nn.Module, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        scores = super().scores(attn, query, key)  # [B, H_kv, G, t]
        cap = self.config.attn_logit_softcapping
        return scores if cap is None else torch.tanh(scores / cap) * cap


@register_adapter
class Llama(DecoderAdapter):
    model_types = ("llama",)
    modeling = "transformers.models.llama.modeling_llama"
    tiny_config = _tiny("llama")


@register_adapter
class Mistral(DecoderAdapter):
    """Every layer uses the config's sliding window (4096 by default)."""

    model_types = ("mistral",)
    modeling = "transformers.models.mistral.modeling_mistral"
    tiny_config = _tiny("mistral")


@register_adapter
class Qwen2(DecoderAdapter):
    """May mix full and sliding layers (``use_sliding_window`` with ``max_window_layers``)."""

    model_types = ("qwen2",)
    modeling = "transformers.models.qwen2.modeling_qwen2"
    takes_mask_mapping = True
    tiny_config = _tiny("qwen2")


@register_adapter
class Qwen3(_PerHeadQKNorm):
    model_types = ("qwen3",)
    modeling = "transformers.models.qwen3.modeling_qwen3"
    takes_mask_mapping = True
    tiny_config = _tiny("qwen3")


@register_adapter
class Gemma(DecoderAdapter):
    model_types = ("gemma",)
    modeling = "transformers.models.gemma.modeling_gemma"
    tiny_config = _tiny("gemma")


@register_adapter
class Gemma2(_SoftCapped):
    """Sliding and full layers alternate; the FFN sits between two norms (zeros stay zeros through the second)."""

    model_types = ("gemma2",)
    modeling = "transformers.models.gemma2.modeling_gemma2"
    takes_mask_mapping = True
    tiny_config = _tiny("gemma2", **_HYBRID)


@register_adapter
class Gemma3(_SoftCapped, _PerHeadQKNorm):
    """Gemma 3's text decoder: per-head q/k norms, local and global RoPE per layer type, hybrid layers."""

    model_types = ("gemma3_text",)
    modeling = "transformers.models.gemma3.modeling_gemma3"
    takes_mask_mapping = True
    tiny_config = _tiny("gemma3_text", **_HYBRID)


@register_adapter
class Phi3(DecoderAdapter):
    """One fused ``qkv_proj``; partial RoPE is handled by the family's ``apply_rotary_pos_emb``."""

    model_types = ("phi3",)
    modeling = "transformers.models.phi3.modeling_phi3"
    tiny_config = _tiny("phi3")

    def query_key(self, attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        qkv = attn.qkv_proj(x)  # [B, t, (H + 2 H_kv) * hd]
        q_size = self.config.num_attention_heads * attn.head_dim
        kv_size = attn.num_key_value_heads * attn.head_dim
        return self._heads(qkv[..., :q_size], attn.head_dim), self._heads(
            qkv[..., q_size : q_size + kv_size], attn.head_dim
        )


@register_adapter
class Olmo2(DecoderAdapter):
    """Norms come after attention and FFN (no input norm); q/k norms span the whole projection."""

    model_types = ("olmo2",)
    modeling = "transformers.models.olmo2.modeling_olmo2"
    tiny_config = _tiny("olmo2")

    def attention_norm(self, layer: nn.Module) -> nn.Module:
        return nn.Identity()

    def query_key(self, attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hd = attn.head_dim
        return self._heads(attn.q_norm(attn.q_proj(x)), hd), self._heads(attn.k_norm(attn.k_proj(x)), hd)
