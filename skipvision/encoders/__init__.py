"""Vision encoders: any timm model, HF CLIP/SigLIP towers. Importing this package registers them."""

from skipvision.encoders import hf_vision, timm_encoder
from skipvision.encoders.base import VisionEncoder

__all__ = ["VisionEncoder", "hf_vision", "timm_encoder"]
