"""Decoder adapters by HF ``model_type`` (docs/adapters.md "Adding a family")."""

from __future__ import annotations

from torch import nn
from transformers import PreTrainedConfig

from skipvision.adapters.base import DecoderAdapter
from skipvision.errors import UnsupportedModelError

ADAPTERS: dict[str, type[DecoderAdapter]] = {}


def register_adapter(cls: type[DecoderAdapter]) -> type[DecoderAdapter]:
    """Class decorator: serve every ``model_type`` in ``cls.model_types`` with ``cls``."""
    for model_type in cls.model_types:
        if model_type in ADAPTERS:
            raise ValueError(f"model_type {model_type!r} already has the adapter {ADAPTERS[model_type].__name__}")
        ADAPTERS[model_type] = cls
    return cls


def supported_model_types() -> list[str]:
    """The HF ``model_type`` values with an adapter, sorted."""
    return sorted(ADAPTERS)


def adapter_for(config: PreTrainedConfig) -> DecoderAdapter:
    """The adapter of a decoder config (its text config for multimodal configs); one line naming the supported
    families when there is none."""
    text = config.get_text_config(decoder=True)
    cls = ADAPTERS.get(text.model_type)
    if cls is None:
        raise UnsupportedModelError(
            f"model_type {text.model_type!r} is not supported: skipvision has decoder adapters for "
            f"{', '.join(supported_model_types())} (docs/adapters.md says how to add one)"
        )
    return cls(text)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layer list of an HF causal LM of a supported family."""
    config = getattr(model, "config", None)
    if not isinstance(config, PreTrainedConfig):
        raise UnsupportedModelError(f"{type(model).__name__} is not a transformers model (it has no config)")
    return adapter_for(config).layers(model)
