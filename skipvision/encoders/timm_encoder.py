"""Any timm model as a vision encoder, features taken at a chosen block (METHOD.md section 2)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch
from timm.data import resolve_model_data_config

from skipvision.encoders.base import VisionEncoder
from skipvision.registry import ENCODERS

TINY_VIT = {
    "model_name": "vit_tiny_patch16_224",
    "img_size": 32,
    "model_kwargs": {"patch_size": 8, "depth": 3, "embed_dim": 32, "num_heads": 2},
}


@ENCODERS.register("timm", tiny=TINY_VIT)
class TimmEncoder(VisionEncoder):
    """A timm model whose block ``feature_layer`` output (negative counts from the end; -2 = penultimate, as in
    LLaVA) becomes the visual tokens. Blocks after the feature layer and the head are pruned, so no parameter goes
    unused (DDP) and no compute is wasted.

    Weights: ``pretrained=True`` takes timm's weights for ``model_name`` (a hub download, not possible offline);
    ``checkpoint_path`` loads a local ``.pth``/``.safetensors`` state dict instead. ``model_kwargs`` go to
    ``timm.create_model`` (e.g. ``depth``, ``embed_dim`` for small test models).
    """

    def __init__(
        self,
        model_name: str,
        pretrained: bool = False,
        checkpoint_path: str | None = None,
        feature_layer: int = -2,
        img_size: int | None = None,
        model_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if checkpoint_path is not None and not Path(checkpoint_path).is_file():
            raise FileNotFoundError(f"timm encoder checkpoint not found: {checkpoint_path}")
        self.model = _create(model_name, pretrained, checkpoint_path, img_size, dict(model_kwargs or {}))
        self.take_indices = self.model.prune_intermediate_layers(
            indices=[feature_layer], prune_norm=True, prune_head=True
        )
        data_cfg = resolve_model_data_config(self.model)
        patch_embed = getattr(self.model, "patch_embed", None)
        size = getattr(patch_embed, "img_size", None) or ((img_size, img_size) if img_size else None)
        size = size or data_cfg["input_size"][1:]
        self.image_size = (int(size[0]), int(size[1]))
        self.mean = tuple(data_cfg["mean"])
        self.std = tuple(data_cfg["std"])
        device = next(self.model.parameters()).device
        with torch.no_grad():
            probe = self.forward(torch.zeros(1, 3, *self.image_size, device=device))  # [1, N, C]
        self.num_tokens, self.out_dim = int(probe.shape[1]), int(probe.shape[2])

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        (feats,) = self.model.forward_intermediates(
            pixel_values, indices=self.take_indices, intermediates_only=True, output_fmt="NCHW"
        )  # [B, C, h, w]
        return feats.flatten(2).transpose(1, 2)  # [B, h*w, C]


def _create(
    model_name: str, pretrained: bool, checkpoint_path: str | None, img_size: int | None, kwargs: dict[str, Any]
) -> torch.nn.Module:
    """``timm.create_model``; ``img_size`` goes to models that take it (ViTs) and is the input size of all."""
    create = dict(pretrained=pretrained, checkpoint_path=checkpoint_path or None, num_classes=0, **kwargs)
    if img_size is None:
        return timm.create_model(model_name, **create)
    try:
        return timm.create_model(model_name, img_size=img_size, **create)
    except TypeError as err:
        if "img_size" not in str(err):
            raise
        return timm.create_model(model_name, **create)  # convolutional nets take any input size
