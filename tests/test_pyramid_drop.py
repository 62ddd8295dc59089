"""PyramidDrop peer (docs/method.md "Peers") through the one in-LLM drop interface (``SkipPolicy.drop_stages``):
training logits, loss and gradients of a tiny VLM against the hand-written per-layer reference of
tests/test_dropping.py, generation against FastV's single stage, the cost model's counts by hand, and ``fit`` +
``generate`` through the CLI."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from skipvision.cli import main
from skipvision.costs import LayerTokens, TokenSchedule, model_schedule
from skipvision.data.tokenizer import load_tokenizer
from skipvision.inference import GenerationConfig, Request, VLMGenerator
from skipvision.model import VisionLanguageModel, instruction_query, next_token_loss
from skipvision.paper import build_meta_model
from skipvision.registry import BACKBONES, ENCODERS, SKIP_POLICIES
from skipvision.skip.layout import SlotLayout
from skipvision.skip.policies.base import DropStage

from .cli_runs import PROMPT, fit_and_generate
from .conftest import TINY_RECIPE
from .test_costs import BENCH
from .test_dropping import STAGES, reference_row
from .test_model import make_batch

TIMEOUT_S = 300


@pytest.fixture(scope="module")
def tokenizer(tiny_shapes: Path):
    return load_tokenizer(tiny_shapes / "tokenizer")


def build(tokenizer, policy: dict, layers: int = 4) -> VisionLanguageModel:
    """The tiny timm ViT + Llama VLM (d=64, ``layers`` decoder layers) with ``policy``; the same weights for every
    policy (the peers add no parameters)."""
    torch.manual_seed(0)
    backbone = BACKBONES.tiny_spec("hf_causal_lm")
    backbone = {**backbone, "config": {**backbone["config"], "num_hidden_layers": layers}}
    encoder = ENCODERS.tiny_spec("timm")
    return VisionLanguageModel.from_specs(encoder, "mlp2x_gelu", backbone, tokenizer, skip={"policy": policy})


def test_stages_scale_with_depth_and_fastv_drops_only_at_inference() -> None:
    default = SKIP_POLICIES.build("pyramid_drop")
    assert [s.layer for s in default.drop_stages(32, training=True)] == [8, 16, 24]
    assert [s.layer for s in default.drop_stages(4, training=False)] == [1, 2, 3]
    assert [s.layer for s in default.drop_stages(2, training=True)] == [1]  # round(0.5), 1 and 2 deduplicated
    assert {s.ratio for s in default.drop_stages(32, training=True)} == {0.5}
    assert default.layout(6, 2, True) == SlotLayout(6)  # every token kept before the LLM, all with FFN
    fastv = SKIP_POLICIES.build({"name": "fastv", "layer": 3, "ratio": 0.25})
    assert fastv.drop_stages(8, training=False) == (DropStage(3, 0.25),) and fastv.drop_stages(8, training=True) == ()
    assert SKIP_POLICIES.build("none").drop_stages(8, training=False) == ()
    for bad in ({"layers": [2, 2]}, {"layers": [0, 1]}, {"layers": []}, {"ratio": 1.0}):
        with pytest.raises(ValueError, match="pyramid_drop: "):
            SKIP_POLICIES.build({"name": "pyramid_drop", **bad})


def test_training_logits_loss_and_gradients_equal_the_per_layer_reference(tokenizer) -> None:
    """Stages (1, 0.5) and (3, 0.5) of tests/test_dropping.py on a right-padded batch of one image, two images and
    text only; each row ranks by its last instruction token."""
    model = build(tokenizer, {"name": "pyramid_drop", "layers": [k for k, _ in STAGES], "ratio": STAGES[0][1]}).train()
    batch = make_batch(tokenizer, model)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    out = model(ids, mask, batch["pixel_values"], batch["num_images"], labels)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert any(p.grad is not None for p in model.encoder.parameters())  # through the image tokens that survive

    query = instruction_query(mask, labels)  # [B]
    with torch.no_grad():
        embedded = model.embed(ids, batch["pixel_values"], batch["num_images"])
        ref_logits = torch.zeros_like(out.logits)
        for b in range(ids.shape[0]):
            first = int((labels[b] != -100).nonzero()[0])
            assert int(query[b]) == first - 1
            slots = embedded.visual_slots[b]
            hidden, kept, made, _ = reference_row(model.backbone, embedded.embeds[b], mask[b], slots, first - 1)
            assert [len(d) for d in made] == [[8, 4], [16, 8], [0, 0]][b]  # 16 slots per image, halved twice
            ref_logits[b, kept] = model.backbone.lm_head(hidden)
    predicted = torch.zeros_like(labels, dtype=torch.bool)
    predicted[:, :-1] = labels[:, 1:] != -100  # [B, T] the positions whose logits the loss reads
    assert (out.logits[predicted] - ref_logits[predicted]).abs().max().item() < 1e-5
    assert abs(out.loss.item() - next_token_loss(ref_logits, labels).item()) < 1e-5


def test_one_stage_generates_exactly_like_fastv(tokenizer) -> None:
    pyramid = VLMGenerator(build(tokenizer, {"name": "pyramid_drop", "layers": [2], "ratio": 0.5}), tokenizer)
    fastv = VLMGenerator(build(tokenizer, {"name": "fastv", "layer": 2, "ratio": 0.5}), tokenizer)
    image = Image.new("RGB", (32, 32), (200, 30, 30))
    requests = [Request("What colour is the circle?", image), Request("Say hello"), Request("How many?", image)]
    config = GenerationConfig(max_new_tokens=4, output_logits=True)
    got, want = pyramid.generate(requests, config), fastv.generate(requests, config)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert all(torch.equal(g.logits, w.logits) for g, w in zip(got, want, strict=True))
    assert [g.stats.kv_bytes_kept for g in got] == [w.stats.kv_bytes_kept for w in want]
    assert got[0].stats.kv_bytes_kept < got[0].stats.kv_bytes_prefill  # 8 of 16 image positions left the cache


def test_cost_schedule_by_hand_on_a_4_layer_model() -> None:
    """Stages at round(4k/4) = 1, 2, 3; 16 slots per image, 12 text tokens: 28 -> 20 -> 16 -> 14 tokens (one image)
    and 44 -> 28 -> 20 -> 16 (two), in training and at prefill alike."""
    model = build_meta_model(
        str(BENCH), ["model.backbone.config.num_hidden_layers=4", "model.skip.policy=pyramid_drop"]
    )
    def layers(*present: int) -> tuple[LayerTokens, ...]:  # layers 0..2 each score the next layer's drop
        return tuple(LayerTokens(n, n, scored=n if i < 3 else 0) for i, n in enumerate(present))

    one = TokenSchedule(layers(28, 20, 16, 14), cached=14)
    two = TokenSchedule(layers(44, 28, 20, 16), cached=16)
    assert model_schedule(model, 12) == one == model_schedule(model, 12, training=True)
    assert model_schedule(model, 12, images=2) == two
    assert TokenSchedule.dropped(4, 12, 16, [DropStage(2, 0.5)]) == TokenSchedule.fastv(4, 12, 16, 2, 0.5)
    with pytest.raises(ValueError, match=r"stage layers \(K\) must increase within \[1, 3\], got 4"):
        TokenSchedule.dropped(4, 12, 16, [DropStage(4, 0.5)])


def test_fit_and_generate_through_the_cli(tiny_overrides: list[str], tmp_path: Path) -> None:
    """Two training steps with the drops on (3 layers, stages at 1 and 2), then ``generate``: the loss is finite, the
    answer comes back, and the cache keeps exactly the cost model's positions."""
    policy = ["model.skip.policy={name: pyramid_drop, layers: [1, 2]}", "model.backbone.config.num_hidden_layers=3"]
    done = fit_and_generate([*tiny_overrides, *policy], tmp_path, TIMEOUT_S, "--stats")
    assert done.losses and all(math.isfinite(x) for x in done.losses), done.fit_log

    out = done.generated
    gen = VLMGenerator.from_checkpoint(done.run)
    [answer] = gen.generate([Request(PROMPT, done.image)], GenerationConfig(max_new_tokens=3))
    stats = answer.stats
    per_position = stats.kv_bytes_prefill // stats.prompt_tokens
    cached = model_schedule(gen.model, stats.prompt_tokens - gen.model.num_image_tokens).cached
    assert stats.kv_bytes_kept == per_position * cached < stats.kv_bytes_prefill
    line = next(i for i, text in enumerate(out) if "B after prefill" in text)
    assert out[line - 1] == answer.text and answer.text is not None
    assert f"{stats.kv_bytes_prefill:,} B after prefill -> {stats.kv_bytes_kept:,} B after removal" in out[line]


def test_activation_checkpointing_is_refused_in_one_line(tiny_overrides: list[str], capsys) -> None:
    policy = ["model.skip.policy={name: pyramid_drop, layers: [1]}", "trainer.activation_checkpointing=true"]
    assert main(["fit", "--recipe", str(TINY_RECIPE), *tiny_overrides, *policy]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "trainer.activation_checkpointing cannot run with skip policy" in err[-1]
