"""Inference: prefill, skipped K/V removal, own decoding loop, checkpoint loading (docs/method.md "KV removal").

The names below load on first access, so importing a submodule (the CLI's argument parser in ``.cli``) does not
import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from skipvision.lazy import lazy_exports

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


__getattr__, __dir__ = lazy_exports(__name__, _MODULES, __all__)
