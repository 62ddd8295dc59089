"""Every registered component builds from its tiny config; encoders, projectors and backbones load real weights
from local files and take features where they say they do."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from transformers import (
    AutoModelForCausalLM,
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from skipvision.adapters import ADAPTERS
from skipvision.encoders.hf_vision import TINY_TOWER
from skipvision.encoders.timm_encoder import TINY_VIT
from skipvision.registry import BACKBONES, ENCODERS, PROJECTORS, REGISTRIES

from .families import FAMILIES

ALL_COMPONENTS = [(kind, name) for kind in ("encoder", "projector", "backbone") for name in REGISTRIES[kind].names()]


@pytest.mark.parametrize(("kind", "name"), ALL_COMPONENTS)
def test_every_component_builds_from_its_tiny_config(kind: str, name: str) -> None:
    registry = REGISTRIES[kind]
    torch.manual_seed(0)
    if kind == "encoder":
        enc = registry.build(registry.tiny_spec(name))
        out = enc(torch.randn(2, 3, *enc.image_size))
        assert out.shape == (2, enc.num_tokens, enc.out_dim)
    elif kind == "projector":
        proj = registry.build(registry.tiny_spec(name), in_dim=6, out_dim=10)
        assert proj(torch.randn(2, 5, 6)).shape == (2, 5, 10)
    else:
        llm = registry.build(registry.tiny_spec(name), vocab_size=50)
        assert llm(input_ids=torch.randint(0, 50, (2, 7))).logits.shape == (2, 7, 50)


def _timm_full() -> torch.nn.Module:
    return timm.create_model(
        TINY_VIT["model_name"], img_size=TINY_VIT["img_size"], num_classes=0, **TINY_VIT["model_kwargs"]
    ).eval()


@pytest.mark.parametrize("feature_layer", [-1, -2, 0])
def test_timm_features_come_from_the_chosen_block_without_prefix_tokens(feature_layer: int) -> None:
    torch.manual_seed(0)
    full = _timm_full()
    enc = ENCODERS.build({**ENCODERS.tiny_spec("timm"), "feature_layer": feature_layer}).eval()
    enc.model.load_state_dict(full.state_dict(), strict=False)
    x = torch.randn(2, 3, 32, 32)
    h = full.patch_embed(x)
    h = full.norm_pre(full._pos_embed(h))
    depth = len(full.blocks)
    for block in full.blocks[: depth + feature_layer + 1 if feature_layer < 0 else feature_layer + 1]:
        h = block(h)
    expected = h[:, full.num_prefix_tokens :]  # CLS dropped, raster order
    torch.testing.assert_close(enc(x), expected)
    assert len(enc.model.blocks) == (depth + feature_layer + 1 if feature_layer < 0 else feature_layer + 1)


def test_timm_loads_a_local_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(1)
    full = _timm_full()
    torch.save(full.state_dict(), tmp_path / "vit.pth")
    enc = ENCODERS.build({**ENCODERS.tiny_spec("timm"), "checkpoint_path": str(tmp_path / "vit.pth")})
    torch.testing.assert_close(enc.model.blocks[0].attn.qkv.weight, full.blocks[0].attn.qkv.weight)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        ENCODERS.build({**ENCODERS.tiny_spec("timm"), "checkpoint_path": str(tmp_path / "missing.pth")})


def test_hf_clip_from_folder_matches_hidden_states_and_drops_cls(tmp_path: Path) -> None:
    torch.manual_seed(0)
    tower = CLIPVisionModel(CLIPVisionConfig(**TINY_TOWER["config"])).eval()
    tower.save_pretrained(tmp_path / "clip")
    enc = ENCODERS.build({"name": "hf_clip", "path": str(tmp_path / "clip")}).eval()
    x = torch.randn(2, 3, 32, 32)
    ref = tower(pixel_values=x, output_hidden_states=True).hidden_states[-2][:, 1:]  # penultimate, no CLS
    torch.testing.assert_close(enc(x), ref)
    assert enc.num_tokens == 16 and len(enc.tower.encoder.layers) == 2
    assert not any(p.requires_grad for p in enc.tower.post_layernorm.parameters())


def test_hf_clip_loads_the_vision_part_of_a_full_clip_checkpoint(tmp_path: Path) -> None:
    """LLaVA points at a full CLIP folder (text + vision); only the vision tower is taken."""
    torch.manual_seed(0)
    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    clip = CLIPModel(CLIPConfig(text_config=text, vision_config=TINY_TOWER["config"])).eval()
    clip.save_pretrained(tmp_path / "clip-full")
    enc = ENCODERS.build({"name": "hf_clip", "path": str(tmp_path / "clip-full"), "feature_layer": -1}).eval()
    x = torch.randn(1, 3, 32, 32)
    ref = clip.vision_model(pixel_values=x, output_hidden_states=True).hidden_states[-1][:, 1:]
    torch.testing.assert_close(enc(x), ref)


def test_hf_siglip_keeps_every_patch_token(tmp_path: Path) -> None:
    torch.manual_seed(0)
    tower = SiglipVisionModel(SiglipVisionConfig(**TINY_TOWER["config"])).eval()
    enc = ENCODERS.build({"name": "hf_siglip", "config": TINY_TOWER["config"], "feature_layer": -2}).eval()
    enc.tower.load_state_dict(tower.state_dict(), strict=False)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(enc(x), tower(pixel_values=x, output_hidden_states=True).hidden_states[-2])
    assert enc.mean == (0.5, 0.5, 0.5)


def test_hf_tower_needs_exactly_one_source(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="exactly one of 'config'"):
        ENCODERS.build({"name": "hf_clip"})
    with pytest.raises(FileNotFoundError, match="No config.json"):
        ENCODERS.build({"name": "hf_clip", "path": str(tmp_path)})


def test_projectors_have_the_documented_structure() -> None:
    mlp = PROJECTORS.build("mlp2x_gelu", in_dim=4, out_dim=8)
    assert [type(m).__name__ for m in mlp] == ["Linear", "GELU", "Linear"]
    assert mlp[0].weight.shape == (8, 4) and mlp[2].weight.shape == (8, 8)


@pytest.mark.parametrize("family", FAMILIES)
def test_backbone_from_folder_equals_saved_model_and_resizes_vocab(tmp_path: Path, family: str) -> None:
    torch.manual_seed(0)
    spec = {"name": "hf_causal_lm", "config": {**ADAPTERS[family].tiny_config, "vocab_size": 40}}
    saved = BACKBONES.build(spec).eval()
    saved.save_pretrained(tmp_path / "llm")
    loaded = BACKBONES.build({"name": "hf_causal_lm", "path": str(tmp_path / "llm")}).eval()
    ids = torch.randint(0, 40, (2, 6))
    torch.testing.assert_close(loaded(input_ids=ids).logits, saved(input_ids=ids).logits)
    assert type(loaded).__name__ == type(AutoModelForCausalLM.from_pretrained(tmp_path / "llm")).__name__
    bigger = BACKBONES.build({"name": "hf_causal_lm", "path": str(tmp_path / "llm")}, vocab_size=45)
    assert bigger.get_input_embeddings().num_embeddings == 45
