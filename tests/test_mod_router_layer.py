"""mod_router's whole-layer mode (docs/method.md "Peers"): in layer l the unchosen image tokens are neither queries
nor keys, their hidden state passes unchanged, and layer l's KV cache never holds them. Training logits, loss and
router gradients against a hand-written loop over the layers (each row alone, each layer run on its chosen rows
only); generation over per-layer caches against the full-sequence forward; the KV bytes, the schedule and the
measured FLOPs; sliding-window families refused."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import AutoModelForCausalLM, DynamicCache

from skipvision.costs import LayerTokens, TokenSchedule, model_schedule, prefill_flops
from skipvision.flops import LLMShape, measured_flops
from skipvision.inference import GenerationConfig, Request, VLMGenerator
from skipvision.model import next_token_loss, positions_from_mask
from skipvision.registry import SKIP_POLICIES
from skipvision.skip.ffn import SkipFFN
from skipvision.skip.in_llm import prefill

from .conftest import tiny_lm_config
from .test_mod_router import RATIOS, lowest_by_hand, unhooked
from .test_model import make_batch
from .test_pyramid_drop import build, tokenizer  # noqa: F401 (a fixture)

POLICY = {"name": "mod_router", "ratios": RATIOS, "mode": "layer"}


def reference_row(model, embeds: torch.Tensor, valid: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Final hidden states [T, D] of one row: before layer l its router ranks the row's image slots on the layer's
    input, the lowest ``floor((1 - r_l) * n)`` sit the layer out, and the layer runs on the others alone (their true
    positions, a causal + padding mask over them); the chosen image rows' output is ``out + (out - in) * (g -
    g.detach())``, the rest of the row passes unchanged."""
    base, policy = model.backbone.model, model.visual.policy
    positions = positions_from_mask(valid[None])[0]  # [T]
    h = embeds  # [T, D]
    for i, layer in enumerate(base.layers):
        scores = policy.routers[i](h).squeeze(-1).float()  # [T]
        where = slots.nonzero().flatten()
        out_of_layer = set(lowest_by_hand(scores, where, 1 - RATIOS[i]).tolist())
        keep = torch.tensor([t for t in range(h.shape[0]) if t not in out_of_layer])  # [n]
        sub = h[keep][None]  # [1, n, D]
        pos = positions[keep]
        see = (pos[None, :] <= pos[:, None]) & valid[keep].bool()[None, :]  # [n, n] causal by position + padding
        see |= torch.eye(len(keep), dtype=torch.bool)
        additive = torch.zeros(len(keep), len(keep)).masked_fill(~see, torch.finfo(torch.float32).min)[None, None]
        cos_sin = base.rotary_emb(sub, pos[None])
        out = layer(sub, attention_mask=additive, position_embeddings=cos_sin, position_ids=pos[None])[0]  # [n, D]
        g = torch.sigmoid(scores[keep])[:, None]  # [n, 1]
        chosen = slots[keep][:, None].to(out.dtype)  # [n, 1]: the chosen image rows (the others here are text)
        out = out + (out - sub[0]) * (g - g.detach()) * chosen
        h = h.index_put((keep,), out)
    return base.norm(h)


def test_training_logits_loss_and_router_gradients_equal_the_layer_loop(tokenizer) -> None:  # noqa: F811
    model = build(tokenizer, POLICY).train()
    batch = make_batch(tokenizer, model)  # one image, two images, text only: rows sit out different counts
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    out = model(ids, mask, batch["pixel_values"], batch["num_images"], labels)
    out.loss.backward()
    ours = {n: p.grad.clone() for n, p in model.visual.policy.named_parameters()}
    model.zero_grad(set_to_none=True)

    embedded = model.embed(ids, batch["pixel_values"], batch["num_images"])
    with unhooked(model):
        hidden = torch.stack(
            [reference_row(model, embedded.embeds[b], mask[b], embedded.visual_slots[b]) for b in range(3)]
        )
        reference = model.backbone.lm_head(hidden)  # [B, T, V]
    predicted = torch.zeros_like(labels, dtype=torch.bool)
    predicted[:, :-1] = labels[:, 1:] != -100  # [B, T] the positions whose logits the loss reads
    assert (out.logits[predicted] - reference[predicted]).abs().max().item() < 1e-5
    loss = next_token_loss(reference, labels)
    assert abs(out.loss.item() - loss.item()) < 1e-5
    loss.backward()
    for name, grad in ours.items():
        torch.testing.assert_close(grad, model.visual.policy.get_parameter(name).grad, atol=1e-6, rtol=1e-4, msg=name)
    assert [bool(ours[f"routers.{i}.weight"].any()) for i in range(4)] == [True, True, True, False]


def test_generation_over_per_layer_caches_equals_the_full_sequence_forward(tokenizer) -> None:  # noqa: F811
    """Each layer's cache holds only the rows it ran on; every decode step's logits equal the eval forward over the
    prompt plus the tokens so far, a batch of an image prompt and a text-only one (left-padded)."""
    model = build(tokenizer, POLICY).eval()
    generator = VLMGenerator(model, tokenizer)
    image = Image.new("RGB", (32, 32), (200, 30, 30))
    requests = [Request("What colour is the circle?", image), Request("Say hello")]
    answers = generator.generate(requests, GenerationConfig(max_new_tokens=4, output_logits=True))
    for request, answer in zip(requests, answers, strict=True):
        [prompt] = generator.encode([request])
        ids = torch.tensor([list(prompt.ids) + answer.token_ids[:3]])  # [1, P + 3]
        pixels = None if prompt.pixels is None else prompt.pixels[None]
        with torch.no_grad():
            full = model(ids, torch.ones_like(ids), pixels, torch.tensor([int(pixels is not None)])).logits[0, -4:]
        assert (answer.logits - full).abs().max().item() < 1e-4
    stats, config = answers[0].stats, model.backbone.config
    schedule = model_schedule(model, stats.prompt_tokens - model.num_image_tokens)
    per_position = 2 * config.num_key_value_heads * config.head_dim * 4 * config.num_hidden_layers  # fp32 k and v
    assert stats.kv_bytes_kept == stats.kv_bytes_prefill == round(per_position * schedule.kv_positions)
    assert schedule.kv_positions < stats.prompt_tokens  # per layer, on average, fewer positions than the prompt's
    text_only = answers[1].stats
    assert text_only.kv_bytes_kept == text_only.kv_bytes_prefill == per_position * text_only.prompt_tokens


def test_the_schedule_by_hand_and_the_measured_prefill(tokenizer) -> None:  # noqa: F811
    """12 text tokens + 16 image slots: layer l runs on 28 - floor(16 (1 - r_l)) tokens and caches them; the
    routers score all 28 before each layer."""
    model = build(tokenizer, POLICY).eval()
    layers = tuple(LayerTokens(n, n, routed=28) for n in (24, 20, 28, 16))
    want = TokenSchedule(layers, cached=(24, 20, 28, 16), length=28)
    assert model_schedule(model, 12) == want and want.kv_positions == 22.0
    batch = make_batch(tokenizer, model)
    n = int(batch["attention_mask"][0].sum())  # row 0 without its right padding: one prompt with one image
    ids, mask = batch["input_ids"][:1, :n], batch["attention_mask"][:1, :n]
    embedded = model.embed(ids, batch["pixel_values"][:1], torch.tensor([1]))
    cache = DynamicCache(config=model.backbone.config)
    measured = measured_flops(lambda: prefill(model, embedded, mask, positions_from_mask(mask), cache))
    schedule = model_schedule(model, n - model.num_image_tokens)
    assert measured == prefill_flops(LLMShape.from_config(model.backbone.config), schedule)
    assert [layer.keys.shape[2] for layer in cache.layers] == list(schedule.layer_cached)


def test_sliding_window_families_are_refused() -> None:
    lm = AutoModelForCausalLM.from_config(tiny_lm_config("mistral", sliding_window=4))
    policy = SKIP_POLICIES.build({**POLICY, "ratios": [0.5, 0.5]}, dim=64, num_layers=2)
    with pytest.raises(ValueError, match="mod_router: mode layer runs on full-attention decoders only; mistral"):
        policy.attach(lm, SkipFFN(lm))
