"""Inference: prefill, skipped K/V removal, own decoding loop, checkpoint loading (docs/method.md "KV removal").

The names below load on first access, so importing a submodule (the CLI's argument parser in ``.cli``) does not
import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from skipvision.inference.generate import Generation, GenerationStats, PromptTooLongError, generate_tokens
    from skipvision.inference.generator import Request, RequestError, VLMGenerator
    from skipvision.inference.sampling import GenerationConfig

_MODULES = {
    "Generation": "skipvision.inference.generate",
    "GenerationStats": "skipvision.inference.generate",
    "PromptTooLongError": "skipvision.inference.generate",
    "generate_tokens": "skipvision.inference.generate",
    "Request": "skipvision.inference.generator",
    "RequestError": "skipvision.inference.generator",
    "VLMGenerator": "skipvision.inference.generator",
    "GenerationConfig": "skipvision.inference.sampling",
}

__all__ = [
    "Generation",
    "GenerationConfig",
    "GenerationStats",
    "PromptTooLongError",
    "Request",
    "RequestError",
    "VLMGenerator",
    "generate_tokens",
]


def __getattr__(name: str) -> Any:
    if name not in _MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_MODULES[name]), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
