"""LLM backbones. Importing this package registers them."""

from skipvision.backbones import hf_causal_lm

__all__ = ["hf_causal_lm"]
