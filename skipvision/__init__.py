"""skipvision: Skip-Vision (ICCV 2025) for vision-language models on unmodified HF transformers and Lightning."""

__version__ = "0.1.0"
