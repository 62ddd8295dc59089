"""Composition (docs/methods.md "Composing methods"): Skip-Vision's FFN skip plus a PyramidDrop-style drop of the
skipped tokens S, in one method (a split policy's ``drop`` schedule). Training logits, loss and gradients against
the hand-written per-layer reference of tests/test_dropping.py with the S slots' MLP output zeroed; the prefill's
cache and measured FLOPs against the cost model; the counts by hand."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import DynamicCache

from skipvision.cli import main
from skipvision.costs import LayerTokens, TokenSchedule, model_schedule, prefill_flops
from skipvision.data.tokenizer import load_tokenizer
from skipvision.flops import LLMShape, measured_flops
from skipvision.inference import GenerationConfig, Request, VLMGenerator
from skipvision.model import VisionLanguageModel, instruction_query, next_token_loss, positions_from_mask
from skipvision.registry import BACKBONES, ENCODERS, SKIP_POLICIES
from skipvision.skip.in_llm import prefill
from skipvision.skip.layout import DropStage, SlotLayout

from .conftest import TINY_RECIPE
from .test_dropping import STAGES, reference_row
from .test_model import make_batch

# 16 visual tokens: 4 retained, 12 merged to 8 skipped, 2 summaries = 14 slots; the drops act on the 8 S slots.
SKIP = {
    "policy": {"name": "uniform", "num_retained": 4, "drop": {"layers": [k for k, _ in STAGES], "ratio": 0.5}},
    "num_skipped": 8,
}


@pytest.fixture(scope="module")
def tokenizer(tiny_shapes):
    return load_tokenizer(tiny_shapes / "tokenizer")


def build(tokenizer) -> VisionLanguageModel:
    torch.manual_seed(0)
    backbone = BACKBONES.tiny_spec("hf_causal_lm")
    backbone = {**backbone, "config": {**backbone["config"], "num_hidden_layers": 4}}
    return VisionLanguageModel.from_specs(ENCODERS.tiny_spec("timm"), "mlp2x_gelu", backbone, tokenizer, skip=SKIP)


def test_the_drop_schedule_and_its_errors() -> None:
    policy = SKIP_POLICIES.build({"name": "uniform", "num_retained": 2, "drop": {"ratio": 0.25}})
    assert policy.drop_stages(32, training=True) == policy.drop_stages(32, training=False)
    assert policy.drop_stages(32, training=True) == tuple(DropStage(k, 0.25) for k in (8, 16, 24))
    assert SlotLayout(4, 8, 2).droppable == 8 and SlotLayout(16).droppable == 16
    for bad, message in (({"layers": [2, 1]}, "strictly increasing"), ({"ratio": 1.0}, r"must be in \(0, 1\)")):
        with pytest.raises(ValueError, match=f"UniformPolicy: drop .*{message}"):
            SKIP_POLICIES.build({"name": "uniform", "num_retained": 2, "drop": bad})


def test_training_equals_the_reference_with_skipped_ffn_and_drops(tokenizer) -> None:
    model = build(tokenizer).train()
    assert model.num_image_tokens == 14 and model.skip_ffn is not None
    batch = make_batch(tokenizer, model)  # one image, two images (and a text-only row, left out: every row drops,
    # so the sequence really shortens and a stale [B, T] Skip-FFN plan could not line up with it)
    ids, mask, labels = batch["input_ids"][:2], batch["attention_mask"][:2], batch["labels"][:2]
    pixels, num_images = batch["pixel_values"][:3], batch["num_images"][:2]
    out = model(ids, mask, pixels, num_images, labels)
    # The reference starts from the embeddings: the token embedding's gradient (through the ids) is ours alone.
    params = [p for name, p in model.backbone.named_parameters() if "embed_tokens" not in name]
    grads = torch.autograd.grad(out.loss, params, allow_unused=True)

    query = instruction_query(mask, labels)  # [B]
    embedded = model.embed(ids, pixels, num_images)
    embeds = embedded.embeds.detach()
    ref_logits = torch.zeros_like(out.logits)
    for b in range(ids.shape[0]):
        skipped = ~embedded.ffn_mask[b]  # [T], the S slots
        hidden, kept, made, _ = reference_row(
            model.backbone, embeds[b], mask[b], skipped, int(query[b]), no_ffn=skipped
        )
        assert [len(d) for d in made] == [[4, 2], [8, 4]][b]  # half of the 8 S per image, then half again
        assert all(bool(skipped[t]) for stage in made for t in stage)  # only S slots leave
        ref_logits = ref_logits.index_put((torch.tensor(b), torch.tensor(kept)), model.backbone.lm_head(hidden))
    predicted = torch.zeros_like(labels, dtype=torch.bool)
    predicted[:, :-1] = labels[:, 1:] != -100  # [B, T] the positions whose logits the loss reads
    assert (out.logits[predicted] - ref_logits[predicted]).abs().max().item() < 1e-5
    ref_loss = next_token_loss(ref_logits, labels)
    assert abs(out.loss.item() - ref_loss.item()) < 1e-5
    ref_grads = torch.autograd.grad(ref_loss, params, allow_unused=True)
    for got, want in zip(grads, ref_grads, strict=True):
        assert (got is None) == (want is None)
        if got is not None:
            assert (got - want).abs().max().item() < 1e-5


def test_prefill_keeps_text_r_and_summaries_and_measures_its_schedule(tokenizer) -> None:
    """12 text tokens + 14 slots, 4 layers: every layer skips the S that are present; layers 0 and 2 score a drop."""
    model = build(tokenizer).eval()
    want = TokenSchedule(
        (LayerTokens(26, 18, scored=26), LayerTokens(22, 18), LayerTokens(22, 18, scored=22), LayerTokens(20, 18)),
        cached=18,
    )
    assert model_schedule(model, 12) == want == model_schedule(model, 12, training=True)

    generator = VLMGenerator(model, tokenizer)
    image = Image.new("RGB", (32, 32), (200, 30, 30))
    [prompt] = generator.encode([Request("What colour is the circle?", image)])
    ids = torch.tensor([list(prompt.ids)])
    embedded = model.embed(ids, prompt.pixels[None], torch.tensor([1]))
    mask, cache = torch.ones_like(ids), DynamicCache(config=model.backbone.config)
    measured = measured_flops(lambda: prefill(model, embedded, mask, positions_from_mask(mask), cache))
    text = ids.shape[1] - 14
    schedule = model_schedule(model, text)
    assert measured == prefill_flops(LLMShape.from_config(model.backbone.config), schedule)
    assert cache.layers[0].keys.shape[2] == schedule.cached == text + 4 + 2  # text, R and both summaries
    [answer] = generator.generate([Request("What colour is the circle?", image)], GenerationConfig(max_new_tokens=2))
    per_position = answer.stats.kv_bytes_prefill // answer.stats.prompt_tokens
    assert answer.stats.kv_bytes_kept == per_position * schedule.cached


def test_build_time_errors(tokenizer) -> None:
    """Bad settings fail when the model is built, in one line, not at the first forward."""
    backbone = BACKBONES.tiny_spec("hf_causal_lm")  # 2 decoder layers
    parts = (ENCODERS.tiny_spec("timm"), "mlp2x_gelu", backbone, tokenizer)
    cases = (
        ({**SKIP, "layers": [5]}, r"Skip-FFN layer index 5 is out of range: valid indices are -2\.\.1"),
        (SKIP, r"UniformPolicy: a drop stage's layer \(K\) must be in \[1, 1\] for this 2-layer backbone, got 3"),
        ({"policy": {"name": "pyramid_drop", "layers": [2]}}, r"must be in \[1, 1\] for this 2-layer backbone, got 2"),
        ({"policy": {"name": "fastv", "layer": 2}}, r"FastV: a drop stage's layer \(K\) must be in \[1, 1\]"),
        (
            {**SKIP, "policy": {**SKIP["policy"], "drop": {"layers": [1]}}, "mask_text_to_skipped": True},
            "model.skip.mask_text_to_skipped cannot run with UniformPolicy's in-LLM drops in training",
        ),
    )
    for skip, message in cases:
        with pytest.raises(ValueError, match=message):
            VisionLanguageModel.from_specs(*parts, skip=skip)


def test_bad_method_settings_are_one_line_cli_errors(tiny_overrides: list[str], capsys) -> None:
    """A method's bad setting is a user error: exit status 2 and one line naming it, no traceback."""
    for policy, message in (
        ("{name: pyramid_drop, ratio: 1.5}", "pyramid_drop: drop ratio (share of image tokens dropped per stage)"),
        ("{name: pyramid_drop, layers: [5]}", "PyramidDrop: a drop stage's layer (K) must be in [1, 1]"),
    ):
        assert main(["fit", "--recipe", str(TINY_RECIPE), *tiny_overrides, f"model.skip.policy={policy}"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
