"""Inference: prefill, skipped K/V removal, own decoding loop, checkpoint loading (METHOD.md section 4)."""

from skipvision.inference.generate import Generation, GenerationStats, PromptTooLongError, generate_tokens
from skipvision.inference.generator import Request, RequestError, VLMGenerator
from skipvision.inference.sampling import GenerationConfig

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
