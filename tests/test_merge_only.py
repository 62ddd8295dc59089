"""Compression-only peer (docs/method.md "Peers"): every image merged to N_r + N_s tokens, all with full compute."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from skipvision.compressors.token_merge import merge_tokens
from skipvision.data.tokenizer import load_tokenizer
from skipvision.model import VisionLanguageModel
from skipvision.registry import BACKBONES, ENCODERS, SKIP_POLICIES
from skipvision.skip.layout import SlotLayout

from .test_model import make_batch

N = 16  # the tiny ViT's tokens per image
K = 6


@pytest.fixture(scope="module")
def tokenizer(tiny_shapes: Path):
    return load_tokenizer(tiny_shapes / "tokenizer")


def build(tokenizer, num_tokens: int) -> VisionLanguageModel:
    torch.manual_seed(0)
    skip = {"policy": {"name": "merge_only", "num_tokens": num_tokens}}
    encoder, backbone = ENCODERS.tiny_spec("timm"), BACKBONES.tiny_spec("hf_causal_lm")
    return VisionLanguageModel.from_specs(encoder, "mlp2x_gelu", backbone, tokenizer, skip=skip).eval()


def test_images_fill_k_slots_with_the_merged_projected_tokens(tokenizer) -> None:
    model = build(tokenizer, K)
    assert model.num_image_tokens == K and model.skip_ffn is None
    batch = make_batch(tokenizer, model)
    slots = batch["input_ids"] == model.image_token_id
    assert slots.sum(-1).tolist() == [K, 2 * K, 0]
    with torch.no_grad():
        embedded = model.embed(batch["input_ids"], batch["pixel_values"], batch["num_images"])
        projected = model.projector(model.encoder(batch["pixel_values"]))  # [3, N, D]
        want = merge_tokens(projected, K)  # [3, K, D]
    assert projected.shape[1] == N
    assert torch.equal(embedded.embeds[slots], want.reshape(-1, want.shape[-1]))
    assert embedded.ffn_mask is None  # every token runs the FFN, no summaries


def test_logits_equal_the_plain_backbone_on_the_merged_embeddings(tokenizer) -> None:
    model = build(tokenizer, K)
    batch = make_batch(tokenizer, model)
    plain = AutoModelForCausalLM.from_config(model.backbone.config).eval()
    plain.load_state_dict(model.backbone.state_dict())
    with torch.no_grad():
        out = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["num_images"])
        embeds = model.embed(batch["input_ids"], batch["pixel_values"], batch["num_images"]).embeds
        ref = plain(inputs_embeds=embeds, attention_mask=batch["attention_mask"])
    real = batch["attention_mask"].bool()
    assert torch.equal(out.logits[real], ref.logits[real])


def test_merging_to_n_keeps_the_projected_tokens(tokenizer) -> None:
    model = build(tokenizer, N)
    feats = torch.randn(2, N, 64)
    with torch.no_grad():
        tokens = model.visual(feats, None)
    assert torch.equal(tokens.tokens, feats) and bool(tokens.ffn.all())


def test_invalid_token_counts_raise(tokenizer) -> None:
    with pytest.raises(ValueError, match=rf"must be between 1 and the {N} visual tokens of an image; got {N + 1}"):
        build(tokenizer, N + 1)
    with pytest.raises(ValueError, match=r"num_tokens \(tokens per image, N_r \+ N_s\) must be >= 1, got 0"):
        SKIP_POLICIES.build({"name": "merge_only", "num_tokens": 0})


def test_tiny_spec_builds_a_non_skipping_policy() -> None:
    policy = SKIP_POLICIES.build(SKIP_POLICIES.tiny_spec("merge_only"))
    assert (policy.layout(6, 2, True), policy.drop_stages(4, training=False)) == (SlotLayout(4), ())
