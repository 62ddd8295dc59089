"""docs/method.md "Masking ablation": text queries cannot attend to the skipped slots S, in training only."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoConfig

from skipvision.adapters import decoder_layers
from skipvision.data.tokenizer import load_tokenizer
from skipvision.lit.module import VLMLitModule
from skipvision.model import Embedded, VisionLanguageModel, positions_from_mask
from skipvision.recipe import SkipConfig, load_recipe
from skipvision.registry import BACKBONES, ENCODERS
from skipvision.skip.in_llm import method_steps
from skipvision.skip.masking import text_to_skipped_mask

from .conftest import TINY_RECIPE
from .test_model import make_batch
from .test_skip_model import N_R, N_S, SKIP, build

ON = {**SKIP, "mask_text_to_skipped": True}


@pytest.fixture(scope="module")
def tokenizer(tiny_shapes: Path):
    return load_tokenizer(tiny_shapes / "tokenizer")


def build_type(tokenizer, model_type: str, skip: dict) -> VisionLanguageModel:
    """``build`` of tests/test_skip_model.py with another decoder family."""
    torch.manual_seed(0)
    backbone = BACKBONES.tiny_spec("hf_causal_lm")
    backbone["config"] = {**backbone["config"], "model_type": model_type}
    return VisionLanguageModel.from_specs(ENCODERS.tiny_spec("timm"), "mlp2x_gelu", backbone, tokenizer, skip=skip)


def prepare(model: VisionLanguageModel, tokenizer) -> tuple[dict, Embedded, torch.Tensor]:
    """The test batch (right padding, a text-only sample), its embeddings (eval mode) and position ids."""
    batch = make_batch(tokenizer, model)
    model.eval()
    with torch.no_grad():
        embedded = model.embed(batch["input_ids"], batch["pixel_values"], batch["num_images"])
    return batch, embedded, positions_from_mask(batch["attention_mask"])


def logits(model: VisionLanguageModel, batch: dict, embedded: Embedded, pos: torch.Tensor, on: bool, train: bool):
    return run(model, batch, embedded, pos, on, train)[0]


def run(
    model: VisionLanguageModel, batch: dict, embedded: Embedded, pos: torch.Tensor, on: bool, train: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [B, T, V] and the first decoder layer's output [B, T, D]."""
    model.mask_text_to_skipped = on
    model.train(train)
    first: list[torch.Tensor] = []
    hook = decoder_layers(model.backbone)[0].register_forward_hook(
        lambda _m, _a, out: first.append(out[0] if isinstance(out, tuple) else out)
    )
    try:
        with torch.no_grad(), method_steps(model, embedded, batch["attention_mask"], pos):
            return model.run_backbone(embedded, batch["attention_mask"], pos).logits, first[0]
    finally:
        hook.remove()


def skipped_positions(batch: dict, image_token_id: int, per_image: int) -> torch.Tensor:
    """[B, T] bool, True at the S slots, from the token ids and the [R][s_R][S][s_S] layout alone."""
    slots = batch["input_ids"] == image_token_id
    skipped = torch.zeros_like(slots)
    for b in range(slots.shape[0]):
        idx = slots[b].nonzero().flatten().view(-1, per_image)  # [images, K]
        skipped[b, idx[:, N_R + 1 : N_R + 1 + N_S].flatten()] = True
    return skipped


def reference_mask(batch: dict, image_token_id: int, per_image: int) -> torch.Tensor:
    """Eager additive mask [B, 1, T, T]: causal & padding & not(real text query -> S key); 0 or finfo.min."""
    real = batch["attention_mask"].bool()  # [B, T]
    t = real.shape[1]
    text = ~(batch["input_ids"] == image_token_id) & real  # [B, T]
    skipped = skipped_positions(batch, image_token_id, per_image)  # [B, T]
    causal = torch.ones(t, t, dtype=torch.bool).tril()  # [T, T]
    allowed = causal[None] & real[:, None, :] & ~(text[:, :, None] & skipped[:, None, :])  # [B, T, T]
    mask = torch.zeros(allowed.shape, dtype=torch.float32).masked_fill(~allowed, torch.finfo(torch.float32).min)
    return mask[:, None]


def reference_logits(model: VisionLanguageModel, batch: dict, embedded: Embedded, pos: torch.Tensor) -> torch.Tensor:
    """The HF backbone (Skip-FFN plan set) in eager attention with the independent 4-D mask passed as-is."""
    impl = model.backbone.config._attn_implementation
    model.backbone.set_attn_implementation("eager")
    model.skip_ffn.set_plan(embedded.ffn_mask)
    try:
        with torch.no_grad():
            mask = reference_mask(batch, model.image_token_id, model.num_image_tokens)
            return model.backbone(inputs_embeds=embedded.embeds, attention_mask=mask, position_ids=pos).logits
    finally:
        model.backbone.set_attn_implementation(impl)


def test_off_by_default_and_threaded_from_the_skip_dict(tokenizer) -> None:
    assert SkipConfig().mask_text_to_skipped is False
    model = build(tokenizer)
    assert model.mask_text_to_skipped is False
    assert build(tokenizer, ON).mask_text_to_skipped is True
    batch, embedded, pos = prepare(model, tokenizer)
    got = logits(model, batch, embedded, pos, on=False, train=True)
    model.skip_ffn.set_plan(embedded.ffn_mask)
    with torch.no_grad():  # the backbone as before: the 2-D padding mask, no extra restriction
        plain = model.backbone(inputs_embeds=embedded.embeds, attention_mask=batch["attention_mask"], position_ids=pos)
    assert torch.equal(got, plain.logits)


@pytest.mark.parametrize(("model_type", "attn"), [("llama", "sdpa"), ("llama", "eager"), ("mistral", "sdpa")])
def test_training_mask_equals_an_independent_eager_reference(tokenizer, model_type: str, attn: str) -> None:
    model = build_type(tokenizer, model_type, ON)
    model.backbone.set_attn_implementation(attn)
    batch, embedded, pos = prepare(model, tokenizer)
    assert torch.equal(~embedded.ffn_mask, skipped_positions(batch, model.image_token_id, model.num_image_tokens))
    on, on_first = run(model, batch, embedded, pos, on=True, train=True)
    off, off_first = run(model, batch, embedded, pos, on=False, train=True)
    ref = reference_logits(model, batch, embedded, pos)
    real = batch["attention_mask"].bool()
    slots = batch["input_ids"] == model.image_token_id
    after = (slots.long().cumsum(-1) > 0) & ~slots & real  # text after (at least) one image: restricted
    assert after.sum(-1).tolist()[2] == 0 and bool(after[:2].any(-1).all())
    torch.testing.assert_close(on[real], ref[real], atol=1e-5, rtol=1e-5)
    # Visual slots attend to the same keys as without the mask: equal after the first layer. Deeper, the keys of
    # restricted text (e.g. the newline between sample 1's two images) differ, so only the positions before the
    # first restricted token (text before the images, the first image, the text-only sample) keep their logits.
    torch.testing.assert_close(on_first[slots], off_first[slots], atol=1e-6, rtol=1e-6)
    untouched = real & (after.long().cumsum(-1) == 0)
    first_image = slots & (slots.long().cumsum(-1) <= model.num_image_tokens)
    assert bool(untouched[first_image].all()) and bool(untouched[2][real[2]].all())
    torch.testing.assert_close(on[untouched], off[untouched], atol=1e-6, rtol=1e-6)
    # The mask really acts on every text token after an image.
    assert bool(((on - off).abs().amax(-1) > 1e-4)[after].all())


def test_eval_mode_ignores_the_mask(tokenizer) -> None:
    model = build(tokenizer, ON)
    batch, embedded, pos = prepare(model, tokenizer)
    assert torch.equal(
        logits(model, batch, embedded, pos, on=True, train=False),
        logits(model, batch, embedded, pos, on=False, train=False),
    )


def test_the_mask_in_the_library_formats(tokenizer) -> None:
    model = build(tokenizer, ON)
    batch, embedded, pos = prepare(model, tokenizer)
    want = reference_mask(batch, model.image_token_id, model.num_image_tokens)
    config = model.backbone.config
    args = (embedded.embeds, batch["attention_mask"], pos, embedded.ffn_mask, embedded.visual_slots)
    sdpa = text_to_skipped_mask(config, *args)
    assert sdpa.dtype == torch.bool and torch.equal(sdpa, want == 0)
    model.backbone.set_attn_implementation("eager")
    assert torch.equal(text_to_skipped_mask(config, *args), want)
    # A hybrid decoder gets one mask per layer type; the sliding one also hides keys 8 or more positions back.
    hybrid = AutoConfig.for_model("qwen2", use_sliding_window=True, sliding_window=8, num_hidden_layers=2)
    hybrid.layer_types = ["sliding_attention", "full_attention"]
    hybrid._attn_implementation = "sdpa"
    masks = text_to_skipped_mask(hybrid, *args)
    assert sorted(masks) == ["full_attention", "sliding_attention"]
    assert torch.equal(masks["full_attention"], want == 0)
    index = torch.arange(want.shape[-1])
    in_window = index[:, None] - index[None, :] < 8  # [T(q), T(k)]
    assert torch.equal(masks["sliding_attention"], (want == 0) & in_window)
    assert not torch.equal(masks["sliding_attention"], masks["full_attention"])


def test_training_step_with_the_mask_backpropagates(tokenizer) -> None:
    model = build(tokenizer, ON).train()
    batch = make_batch(tokenizer, model)
    out = model(
        batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["num_images"], batch["labels"]
    )
    out.loss.backward()
    assert torch.isfinite(out.loss) and model.projector[0].weight.grad.abs().sum() > 0


def test_recipe_key_reaches_the_lightning_module(tiny_shapes: Path) -> None:
    skip = ["model.skip.policy={name: attention_score, num_retained: 4}", "model.skip.num_skipped=4"]
    for value in (False, True):
        cfg = load_recipe(TINY_RECIPE, [*skip, f"model.skip.mask_text_to_skipped={str(value).lower()}"])
        lit = VLMLitModule(OmegaConf.to_container(cfg, resolve=True), str(tiny_shapes / "tokenizer"))
        assert lit.model.mask_text_to_skipped is value
