"""The decoder families under test: ONE list, used by every family-parametrized test (docs/adapters.md).

Adding a family = one adapter in skipvision/adapters/families.py + its model_type here. Also the independent
references those tests compare against: a whole-sequence, no-cache forward of the plain HF model whose layers get
hand-built masks (per layer, so a token can vanish from layer K on, as FastV drops it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.cache_utils import get_layer_types_and_kwargs

from skipvision.adapters import ADAPTERS

FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3_text", "phi3", "olmo2"]
VOCAB = 97


def tiny_lm(model_type: str, attn: str | None = None, seed: int = 0, **overrides: object) -> nn.Module:
    """The family's tiny adapter config as a random fp32 causal LM in eval mode (same seed = same weights); the
    attention implementation is transformers' default for the family unless ``attn`` is given (Gemma 2 has no sdpa)."""
    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(**{**ADAPTERS[model_type].tiny_config, "vocab_size": VOCAB, **overrides})
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=torch.float32).eval()


def eager_twin(model: nn.Module) -> nn.Module:
    """The same weights under eager attention (the references' implementation)."""
    twin = AutoModelForCausalLM.from_config(model.config, attn_implementation="eager", dtype=torch.float32).eval()
    twin.load_state_dict(model.state_dict())
    return twin


def windows(model: nn.Module) -> list[int | None]:
    """Per decoder layer: its sliding window, or None for full attention (read from the config, not the adapter)."""
    types, kwargs = get_layer_types_and_kwargs(model.config)
    pairs = zip(types, kwargs, strict=True)
    return [kw.get("sliding_window") if kind == "sliding_attention" else None for kind, kw in pairs]


def allowed(positions: torch.Tensor, valid: torch.Tensor, window: int | None) -> torch.Tensor:
    """[B, L, L] bool: causal by true position, padding keys hidden, and the window rule ``q - k < window``; a
    query always sees itself (so padding rows are never fully masked)."""
    q, k = positions[:, :, None], positions[:, None, :]  # [B, L, 1], [B, 1, L]
    index = torch.arange(positions.shape[1])
    see = (index[None, None, :] <= index[None, :, None]) & (k <= q) & valid.bool()[:, None, :]
    if window is not None:
        see &= q - k < window
    return see | torch.eye(positions.shape[1], dtype=torch.bool)[None]


def reference_logits(
    model: nn.Module, embeds: torch.Tensor, positions: torch.Tensor, masks: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Logits [B, L, V] of one no-cache forward of the eager ``model`` where decoder layer i attends by ``masks[i]``
    ([B, L, L] bool, True = may attend), given to each layer as its additive 4-D mask by a pre-hook."""
    layers = model.model.layers
    handles = []
    for layer, see in zip(layers, masks, strict=True):
        additive = torch.zeros(see.shape).masked_fill(~see, torch.finfo(torch.float32).min)[:, None]  # [B,1,L,L]

        def hook(_m: nn.Module, args: tuple, kwargs: dict, additive: torch.Tensor = additive) -> tuple:
            return args, {**kwargs, "attention_mask": additive}

        handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            return model(inputs_embeds=embeds, position_ids=positions).logits
    finally:
        for handle in handles:
            handle.remove()
