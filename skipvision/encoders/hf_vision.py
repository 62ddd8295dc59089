"""HF vision towers (CLIP, SigLIP) as vision encoders, built from a config dict or a local folder.

LLaVA takes the penultimate layer's hidden states of CLIP ViT-L/14-336 without the CLS token;
``feature_layer`` indexes ``hidden_states`` the same way (-2 = penultimate layer's output). Layers past
the feature layer are removed; the unused post-norm/pooling head is frozen so DDP sees no unused trainable weight.
CLIP also gives the feature layer's [CLS] attention scores (the paper's selection rule) without eager attention.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

from skipvision.encoders.base import VisionEncoder, cls_attention_scores, run_scoring_block_input
from skipvision.errors import UnsupportedModelError
from skipvision.registry import ENCODERS, RegistryError
from skipvision.skeleton import building_skeleton
from skipvision.weights.llava import llava_config, read_part
from skipvision.weights.strict import WeightsMismatchError, load_strict

TINY_TOWER = {
    "config": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 3,
        "num_attention_heads": 2,
        "image_size": 32,
        "patch_size": 8,
    }
}

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN, SIGLIP_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


class HFVisionTower(VisionEncoder):
    """A transformers vision model; ``prefix_tokens`` leading tokens (CLIP's CLS) are dropped from the output.

    ``drop_tokens`` overrides that count (an HF LLaVA folder sets it from its ``vision_feature_select_strategy``:
    ``full`` keeps every token, ``default`` drops the first, even SigLIP's patch token, as transformers does).
    ``has_cls`` when a CLIP tower's CLS is dropped and at least one layer is kept. ``processor``: a folder whose image
    processor feeds the tower (default: ``path``); ``pad_to_square`` pads images first (LLaVA-1.5).
    """

    def __init__(
        self,
        model_cls: type[nn.Module],
        config_cls: type,
        prefix_tokens: int,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        config: dict[str, Any] | None,
        path: str | None,
        feature_layer: int | None,
        attn_implementation: str,
        pad_to_square: bool = False,
        drop_tokens: int | None = None,
        processor: str | None = None,
    ) -> None:
        super().__init__()
        self.processor = Path(processor) if processor is not None else Path(path) if path is not None else None
        self.pad_to_square = pad_to_square
        if (config is None) == (path is None):
            raise RegistryError(f"{model_cls.__name__}: give exactly one of 'config' (a dict) or 'path' (a folder)")
        weights, tower_prefix = None, prefix_tokens
        llava = llava_config(path) if path is not None else None
        if llava is not None:  # the vision tower of an HF LLaVA folder, with its feature layer and selection
            full = AutoConfig.from_pretrained(path)
            if not isinstance(full.vision_config, config_cls):
                raise UnsupportedModelError(
                    f"{path}: its vision tower is a {full.vision_config.model_type}, not a {config_cls.model_type}"
                )
            if feature_layer is None and not isinstance(full.vision_feature_layer, int):
                raise UnsupportedModelError(f"{path}: features from several layers are not supported")
            feature_layer = full.vision_feature_layer if feature_layer is None else feature_layer
            if drop_tokens is None:  # LLaVA's "default" drops the first token whatever the tower (SigLIP: a patch)
                drop_tokens = 0 if full.vision_feature_select_strategy == "full" else 1
            full.vision_config._attn_implementation = attn_implementation
            full.vision_config.dtype = torch.float32
            self.tower = model_cls(full.vision_config)
            weights = None if building_skeleton() else read_part(path, "vision")
            mean, std = _processor_stats(Path(path), mean, std)
        elif path is not None:
            if not (Path(path) / "config.json").is_file():
                raise FileNotFoundError(f"No config.json in vision tower folder {path}")
            kind = json.loads((Path(path) / "config.json").read_text()).get("model_type")
            towers = (config_cls.model_type, config_cls.model_type.removesuffix("_vision_model"))
            if kind not in towers:
                raise UnsupportedModelError(
                    f"{path} holds a {kind!r} model, not a {config_cls.model_type} (or {towers[1]}, or llava) one"
                )
            if building_skeleton():  # the architecture only (skipvision/skeleton.py)
                saved = config_cls.from_pretrained(path, attn_implementation=attn_implementation)
                self.tower = model_cls(saved)
            else:
                self.tower, info = model_cls.from_pretrained(
                    path, attn_implementation=attn_implementation, output_loading_info=True, dtype=torch.float32
                )
                if info["missing_keys"]:  # transformers would leave them randomly initialised
                    raise WeightsMismatchError(
                        f"{path} does not fit {model_cls.__name__}: {len(info['missing_keys'])} missing "
                        f"({', '.join(sorted(info['missing_keys'])[:5])})"
                    )
            mean, std = _processor_stats(Path(path), mean, std)
        else:
            self.tower = model_cls(config_cls(**config, attn_implementation=attn_implementation))
        feature_layer = -2 if feature_layer is None else feature_layer
        prefix_tokens = prefix_tokens if drop_tokens is None else drop_tokens
        cfg = self.tower.config
        body = getattr(self.tower, "vision_model", self.tower)  # transformers 5 flattened CLIP/SigLIP towers
        layers = body.encoder.layers
        keep = feature_layer + 1 if feature_layer >= 0 else len(layers) + 1 + feature_layer
        if not 0 <= keep <= len(layers):
            raise RegistryError(f"feature_layer {feature_layer} is out of range for {len(layers)} layers")
        del layers[keep:]
        if weights is not None:  # LLaVA never runs the layers past its feature layer either

            def past_feature_layer(key: str) -> bool:
                return key.startswith("encoder.layers.") and int(key.split(".")[2]) >= keep

            load_strict(self.tower, weights, f"{path} (vision tower)", unused_ok=past_feature_layer)
        for name, param in body.named_parameters():
            if not name.startswith(("embeddings.", "pre_layrnorm.", "encoder.")):
                param.requires_grad_(False)
        self.prefix_tokens = prefix_tokens
        self.tokens_before_patches = tower_prefix  # the tower's own leading tokens (CLIP's CLS; none in SigLIP)
        self.has_cls = prefix_tokens == 1 and tower_prefix == 1 and keep >= 1  # SigLIP's first token is a patch
        self.out_dim = cfg.hidden_size
        self.image_size = (cfg.image_size, cfg.image_size)
        self.num_tokens = (cfg.image_size // cfg.patch_size) ** 2 + tower_prefix - prefix_tokens
        self.mean, self.std = mean, std

    def image_processor_folder(self) -> Path | None:
        """``processor`` (default: the checkpoint folder) when it has a ``preprocessor_config.json``."""
        if self.processor is not None and (self.processor / "preprocessor_config.json").is_file():
            return self.processor
        return None

    def blocks(self) -> list[nn.Module]:
        """The encoder layers kept up to the feature layer."""
        return list(getattr(self.tower, "vision_model", self.tower).encoder.layers)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.tower(pixel_values=pixel_values, output_hidden_states=True)
        return out.hidden_states[-1][:, self.prefix_tokens :]  # [B, N, C]

    def forward_with_cls_attention(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Features and the feature layer's [CLS] attention (summed over heads, patch positions only).

        The feature layer's ``layer_norm1`` and ``q_proj``/``k_proj`` give the [CLS] query and all keys from the
        layer's input, inside its call (:func:`run_scoring_block_input`), so only one attention row is formed (any
        ``attn_implementation``), without gradient: the scores only select tokens.
        """
        if not self.has_cls:
            return super().forward_with_cls_attention(pixel_values)
        layer = getattr(self.tower, "vision_model", self.tower).encoder.layers[-1]
        attn = layer.self_attn

        def score(x: torch.Tensor) -> torch.Tensor:
            h = layer.layer_norm1(x)  # [B, T, C], the feature layer's normed input
            batch, tokens, _ = h.shape
            q = attn.q_proj(h[:, :1]).view(batch, 1, attn.num_heads, attn.head_dim).transpose(1, 2)  # [B, H, 1, d]
            k = attn.k_proj(h).view(batch, tokens, attn.num_heads, attn.head_dim).transpose(1, 2)  # [B, H, T, d]
            return cls_attention_scores(q, k, attn.scale, self.prefix_tokens)  # [B, N]

        return run_scoring_block_input(layer, lambda: self.forward(pixel_values), score)  # [B, N, C], [B, N]


def _processor_stats(path: Path, mean: tuple, std: tuple) -> tuple[tuple, tuple]:
    """Normalisation from the folder's preprocessor_config.json when it has one."""
    cfg_file = path / "preprocessor_config.json"
    if not cfg_file.is_file():
        return mean, std
    cfg = json.loads(cfg_file.read_text())
    return tuple(cfg.get("image_mean", mean)), tuple(cfg.get("image_std", std))


def _register_tower(
    name: str, model_cls: type[nn.Module], config_cls: type, prefix_tokens: int, mean: tuple, std: tuple, doc: str
) -> None:
    def build(
        config: dict[str, Any] | None = None,
        path: str | None = None,
        feature_layer: int | None = None,
        attn_implementation: str = "sdpa",
        pad_to_square: bool = False,
        drop_tokens: int | None = None,
        processor: str | None = None,
    ) -> HFVisionTower:
        return HFVisionTower(
            model_cls,
            config_cls,
            prefix_tokens,
            mean,
            std,
            config,
            path,
            feature_layer,
            attn_implementation,
            pad_to_square,
            drop_tokens,
            processor,
        )

    build.__doc__ = doc
    ENCODERS.register(name, tiny=TINY_TOWER)(build)


_register_tower(
    "hf_clip",
    CLIPVisionModel,
    CLIPVisionConfig,
    1,
    CLIP_MEAN,
    CLIP_STD,
    "CLIP vision tower (``CLIPVisionModel``); a full CLIP checkpoint folder works too. CLS dropped.",
)
_register_tower(
    "hf_siglip",
    SiglipVisionModel,
    SiglipVisionConfig,
    0,
    SIGLIP_MEAN,
    SIGLIP_STD,
    "SigLIP vision tower (``SiglipVisionModel``); it has no CLS token.",
)
