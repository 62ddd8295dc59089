"""Any timm model as a vision encoder, features taken at a chosen block (docs/method.md "Token pipeline")."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.data import resolve_model_data_config
from timm.layers import Attention

from skipvision.encoders.base import VisionEncoder, cls_attention_scores, run_scoring_block_input
from skipvision.registry import ENCODERS, RegistryError
from skipvision.skeleton import building_skeleton

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

    ``has_cls``: ViT-like models with a class token whose feature block is a standard timm ``Block`` (``norm1`` then
    ``attn``, an ``Attention`` with fused ``qkv``) give [CLS] attention scores from ``forward_with_cls_attention``.
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
        try:
            weights = (False, None) if building_skeleton() else (pretrained, checkpoint_path)  # skipvision/skeleton.py
            self.model = _create(model_name, *weights, img_size, dict(model_kwargs or {}))
        except RuntimeError as err:
            if not str(err).startswith("Unknown model"):
                raise
            raise RegistryError(f"timm has no model {model_name!r} (timm.list_models() lists them)") from None
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
        block = self.model.blocks[self.take_indices[-1]] if hasattr(self.model, "blocks") else None
        self.has_cls = (
            getattr(self.model, "cls_token", None) is not None
            and getattr(self.model, "num_prefix_tokens", 0) >= 1
            and isinstance(getattr(block, "attn", None), Attention)
            and hasattr(block, "norm1")
        )

    def blocks(self) -> list[torch.nn.Module]:
        """ViT-style ``blocks`` (those kept up to the feature layer); CNNs without them are one unit."""
        return list(self.model.blocks) if hasattr(self.model, "blocks") else []

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        (feats,) = self.model.forward_intermediates(
            pixel_values, indices=self.take_indices, intermediates_only=True, output_fmt="NCHW"
        )  # [B, C, h, w]
        return feats.flatten(2).transpose(1, 2)  # [B, h*w, C]

    def forward_with_cls_attention(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Features and the feature block's [CLS] attention (summed over heads, patch positions only).

        The feature block's output is the features; its attention is computed from its input, inside the block's
        call (:func:`run_scoring_block_input`), during the ordinary forward. Only the [CLS] query row is formed (no
        [T, T] map), without gradient: the scores only select tokens.
        """
        if not self.has_cls:
            return super().forward_with_cls_attention(pixel_values)
        block = self.model.blocks[self.take_indices[-1]]
        num_prefix = self.model.num_prefix_tokens
        return run_scoring_block_input(
            block, lambda: self.forward(pixel_values), lambda x: _timm_cls_attention(block, x, num_prefix)
        )  # [B, N, C], [B, N]


def _timm_cls_attention(block: torch.nn.Module, x: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """[CLS] attention of a timm ``Block`` on its input ``x`` [B, T, C], with the block's own ``norm1``, ``qkv``
    weights and q/k norms; returns [B, T - num_prefix]."""
    attn = block.attn
    h = block.norm1(x)  # [B, T, C]
    batch, tokens, _ = h.shape
    w_q, w_k, _ = attn.qkv.weight.chunk(3)  # [A, C] each; qkv's output is laid out (3, heads, head_dim)
    b_q, b_k = attn.qkv.bias.chunk(3)[:2] if attn.qkv.bias is not None else (None, None)
    q = F.linear(h[:, :1], w_q, b_q).view(batch, 1, attn.num_heads, attn.head_dim).transpose(1, 2)  # [B, H, 1, d]
    k = F.linear(h, w_k, b_k).view(batch, tokens, attn.num_heads, attn.head_dim).transpose(1, 2)  # [B, H, T, d]
    return cls_attention_scores(attn.q_norm(q), attn.k_norm(k), attn.scale, num_prefix)  # [B, N]


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
