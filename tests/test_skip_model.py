"""The VLM with Skip-Vision on: slot layout [R][s_R][S][s_S], the Skip-FFN plan, losses, decoding and a CLI fit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from skipvision.adapters import decoder_layers
from skipvision.compressors.token_merge import merge_tokens
from skipvision.data.tokenizer import load_tokenizer
from skipvision.model import ImageTokenMismatchError, VisionLanguageModel
from skipvision.registry import BACKBONES, ENCODERS

from .test_fit import _fit
from .test_model import make_batch

N_R, N_S = 4, 4  # of the tiny ViT's 16 tokens: 12 candidates merged to 4
SKIP = {"policy": {"name": "attention_score", "num_retained": N_R}, "compressor": "token_merge", "num_skipped": N_S}


@pytest.fixture(scope="module")
def tokenizer(tiny_shapes: Path):
    return load_tokenizer(tiny_shapes / "tokenizer")


def build(tokenizer, skip: dict | None = SKIP) -> VisionLanguageModel:
    torch.manual_seed(0)
    backbone = BACKBONES.tiny_spec("hf_causal_lm")
    encoder = ENCODERS.tiny_spec("timm")
    return VisionLanguageModel.from_specs(encoder, "mlp2x_gelu", backbone, tokenizer, skip=skip).eval()


def test_slot_count_and_layout_follow_method_section_2(tokenizer) -> None:
    model = build(tokenizer)
    assert model.num_image_tokens == N_R + 1 + N_S + 1
    batch = make_batch(tokenizer, model)
    assert (batch["input_ids"] == model.image_token_id).sum(-1).tolist() == [10, 20, 0]
    px = batch["pixel_values"]
    with torch.no_grad():
        embedded = model.embed(batch["input_ids"], px, batch["num_images"])
        feats, cls = model.encoder.forward_with_cls_attention(px)
        proj = model.projector(feats)  # [3, 16, D]
        keep = cls.topk(N_R, dim=1).indices.sort(dim=1).values  # the paper's rule, raster order
        drop = torch.stack([torch.tensor([i for i in range(16) if i not in row]) for row in keep.tolist()])
        kept = torch.stack([proj[m, keep[m]] for m in range(3)])
        merged = merge_tokens(torch.stack([proj[m, drop[m]] for m in range(3)]), N_S)
        pool = model.visual.summary
        want = torch.cat([kept, pool(kept)[:, None], merged, pool(merged)[:, None]], dim=1)  # [3, 10, D]
    slots = batch["input_ids"] == model.image_token_id
    torch.testing.assert_close(embedded.embeds[slots], want.reshape(-1, want.shape[-1]))
    skipped = slots & ~embedded.ffn_mask
    assert skipped.sum(-1).tolist() == [N_S, 2 * N_S, 0]
    first = slots[0].nonzero().flatten()
    assert skipped[0].nonzero().flatten().tolist() == first[N_R + 1 : N_R + 1 + N_S].tolist()


def test_mlps_see_only_the_non_skipped_rows(tokenizer) -> None:
    model = build(tokenizer)
    batch = make_batch(tokenizer, model)
    rows: list[int] = []
    hooks = [
        layer.mlp.gate_proj.register_forward_pre_hook(lambda _m, args: rows.append(args[0].shape[:-1].numel()))
        for layer in decoder_layers(model.backbone)
    ]
    with torch.no_grad():
        model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["num_images"])
    for h in hooks:
        h.remove()
    total = batch["input_ids"].numel()
    assert rows == [total - 3 * N_S] * len(hooks)  # 3 images, N_S skipped slots each, in every layer


def test_full_model_policy_attaches_nothing_and_keeps_every_token(tokenizer) -> None:
    model = build(tokenizer, skip=None)
    assert model.skip_ffn is None and model.num_image_tokens == 16
    assert "forward" not in decoder_layers(model.backbone)[0].mlp.__dict__
    assert build(tokenizer, skip={"policy": "none"}).num_image_tokens == 16


def test_summary_ablation_and_no_merge(tokenizer) -> None:
    assert build(tokenizer, {**SKIP, "summary_tokens": False}).num_image_tokens == N_R + N_S
    assert build(tokenizer, {"policy": {"name": "uniform", "num_retained": N_R}}).num_image_tokens == 16 + 2
    with pytest.raises(ValueError, match="num_skipped \\(N_s\\) must be between 1 and the 12 skip candidates"):
        build(tokenizer, {**SKIP, "num_skipped": 13})


def test_router_aux_loss_is_part_of_the_loss(tokenizer) -> None:
    model = build(tokenizer, {**SKIP, "policy": {"name": "router", "num_retained": N_R}})
    batch = make_batch(tokenizer, model)
    out = model(
        batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["num_images"], batch["labels"]
    )
    assert out.aux_loss is not None and float(out.aux_loss) > 0
    out.loss.backward()
    assert model.visual.policy.scorer[1].weight.grad.abs().sum() > 0


def test_placeholder_expansion_must_match_the_skip_layout(tokenizer) -> None:
    model = build(tokenizer)
    full = build(tokenizer, skip=None)
    batch = make_batch(tokenizer, full)  # expanded for 16 slots per image, the model fills 10
    with pytest.raises(ImageTokenMismatchError, match="sample 0 has 16 image-token slots but 1 image\\(s\\) x 10"):
        model.embed(batch["input_ids"], batch["pixel_values"], batch["num_images"])


def test_cli_fit_with_skip_vision(tiny_overrides: list[str], tmp_path: Path) -> None:
    skip = [
        "model.skip.policy={name: attention_score, num_retained: 4}",
        "model.skip.num_skipped=4",
    ]
    assert _fit([*tiny_overrides, *skip]) == 0
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 2
    assert ckpt["hyper_parameters"]["recipe"]["model"]["skip"]["num_skipped"] == 4
    assert any(k.startswith("model.visual.summary.") for k in ckpt["state_dict"])


@pytest.mark.parametrize(
    "backbone",
    [
        "{model_type: mistral}",  # every layer sliding (default window 4096)
        "{model_type: gemma3_text, sliding_window: 8, layer_types: [sliding_attention, full_attention]}",
    ],
)
def test_fit_with_sliding_window_backbones_validates_through_kv_removal(
    tiny_overrides: list[str], tmp_path: Path, backbone: str
) -> None:
    """End-of-fit validation decodes with the skipped K/V removed from sliding-window (and hybrid) caches."""
    skip = ["model.skip.policy={name: attention_score, num_retained: 4}", "model.skip.num_skipped=4"]
    model_type = backbone.split(",")[0].split(":")[1].strip(" }")
    sizes = "hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 2, head_dim: 16"
    spec = f"model.backbone={{name: hf_causal_lm, config: {backbone[:-1]}, {sizes}, num_key_value_heads: 1}}}}"
    assert _fit([*tiny_overrides, *skip, spec]) == 0
    [metrics] = (tmp_path / "run" / "logs").glob("version_*/metrics.csv")
    header, *rows = metrics.read_text().splitlines()
    column = header.split(",").index("val/acc_all")
    assert [row.split(",")[column] for row in rows if row.split(",")[column]]  # validation decoded and scored
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["hyper_parameters"]["recipe"]["model"]["backbone"]["config"]["model_type"] == model_type


@pytest.mark.parametrize("skip", [SKIP, {"policy": {"name": "router", "num_retained": N_R}, "num_skipped": N_S}])
def test_spmd_text_only_batch_runs_the_vision_side_without_changing_the_loss(tokenizer, skip: dict) -> None:
    """docs/distributed.md "SPMD": a distributed rank with a text-only batch still calls the encoder, projector and
    summary pooling (and a learned policy), so its DDP/FSDP collectives match its peers'; the loss is unchanged and
    the vision parameters get zero gradients."""
    model = build(tokenizer, skip).train()
    batch = make_batch(tokenizer, model)
    text = batch["num_images"] == 0  # the text-only sample
    ids, mask = batch["input_ids"][text], batch["attention_mask"][text]
    labels = ids.clone()

    calls = []
    for module in (model.projector, model.visual.summary, model.visual.policy):
        module.register_forward_hook(lambda m, args, out: calls.append(type(m).__name__))
    plain = model(ids, mask, None, torch.tensor([0]), labels)
    assert calls == []
    model.spmd = True
    spmd = model(ids, mask, None, torch.tensor([0]), labels)
    assert set(calls) >= {type(model.projector).__name__, "SummaryPooling"}
    assert torch.equal(spmd.logits, plain.logits) and torch.equal(spmd.loss, plain.loss)
    spmd.loss.backward()
    vision = [*model.encoder.parameters(), *model.projector.parameters(), *model.visual.parameters()]
    assert all(p.grad is not None and torch.count_nonzero(p.grad) == 0 for p in vision)  # the encoder ran too
    assert any(torch.count_nonzero(p.grad) > 0 for p in model.backbone.parameters())


def test_spmd_blank_image_takes_the_encoders_dtype(tokenizer) -> None:
    """Under ``trainer.precision=bf16-true`` the batches arrive in bf16 and so must the blank image of a text-only
    batch (a timm encoder does not cast its input)."""
    model = build(tokenizer).to(torch.bfloat16).train()
    batch = make_batch(tokenizer, model)
    text = batch["num_images"] == 0
    ids, mask = batch["input_ids"][text], batch["attention_mask"][text]
    plain = model(ids, mask, None, torch.tensor([0]), ids).loss
    model.spmd = True
    assert torch.equal(model(ids, mask, None, torch.tensor([0]), ids).loss, plain)
