"""Decoder adapters: everything skipvision knows of HF decoder internals, one class per family (docs/adapters.md)."""

from skipvision.adapters import families as _families  # noqa: F401  (registers the built-in families)
from skipvision.adapters.base import FULL, SLIDING, DecoderAdapter
from skipvision.adapters.registry import (
    ADAPTERS,
    adapter_for,
    decoder_layers,
    register_adapter,
    supported_model_types,
)

__all__ = [
    "ADAPTERS",
    "FULL",
    "SLIDING",
    "DecoderAdapter",
    "adapter_for",
    "decoder_layers",
    "register_adapter",
    "supported_model_types",
]
