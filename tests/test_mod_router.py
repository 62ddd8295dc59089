"""mod_router peer (docs/method.md "Peers"): a learned router per decoder layer chooses which image tokens run that
layer's FFN. Training logits, loss and router gradients of a tiny VLM against a hand-written loop over the decoder
layers (each layer's choice made by hand from its input with a stable sort); generation's prefill and decode steps
against the full-sequence forward; the shifted-cosine schedule and the cost model by hand; SPMD on a text-only
batch; ``fit`` + ``generate`` through the CLI."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers.masking_utils import create_causal_mask

from skipvision.costs import LayerTokens, TokenSchedule, model_schedule, train_step_flops
from skipvision.flops import LLMShape, measured_flops
from skipvision.inference import GenerationConfig, Request, VLMGenerator
from skipvision.model import next_token_loss, positions_from_mask
from skipvision.paper import build_meta_model
from skipvision.registry import SKIP_POLICIES
from skipvision.skip.in_llm import method_steps
from skipvision.skip.policies.mod_router import shifted_cosine

from .cli_runs import PROMPT, fit_and_generate
from .test_costs import BENCH
from .test_model import make_batch
from .test_pyramid_drop import build, tokenizer  # noqa: F401 (a fixture)

TIMEOUT_S = 300
RATIOS = [0.75, 0.5, 1.0, 0.25]  # keep ratios of the 4 layers: one keeps every image token


def router(model):
    return model.visual.policy


@contextmanager
def unhooked(model) -> Iterator[None]:
    """The plain backbone: Skip-FFN's MLP overrides off, the method's routing off (no slots)."""
    model.visual.policy.route(None)
    model.skip_ffn.detach()
    try:
        yield
    finally:
        model.skip_ffn.attach()


def layer_loop_logits(model, embeds: torch.Tensor, mask: torch.Tensor, gate_of: Callable) -> torch.Tensor:
    """Logits [B, T, V] of the VLM's plain backbone with its decoder layers looped over by hand; each layer's MLP
    output (the MLP runs on every row) is multiplied by ``gate_of(layer index, layer input [B, T, D])`` [B, T]."""
    with unhooked(model):
        return _layer_loop(model, embeds, mask, gate_of)


def _layer_loop(model, embeds: torch.Tensor, mask: torch.Tensor, gate_of: Callable) -> torch.Tensor:
    base = model.backbone.model
    positions = positions_from_mask(mask)  # [B, T]
    kwargs = {
        "attention_mask": create_causal_mask(model.backbone.config, embeds, mask, None, positions),
        "position_ids": positions,
        "position_embeddings": base.rotary_emb(embeds, positions),
    }
    h = embeds  # [B, T, D]
    for i, layer in enumerate(base.layers):
        gate = gate_of(i, h)  # [B, T]
        handle = layer.mlp.register_forward_hook(lambda _m, _a, out, gate=gate: out * gate[..., None].to(out.dtype))
        h = layer(h, **kwargs)
        handle.remove()
    return model.backbone.lm_head(base.norm(h))  # [B, T, V]


def lowest_by_hand(scores: torch.Tensor, where: torch.Tensor, share: float) -> torch.Tensor:
    """The ``floor(share * n)`` of the n positions ``where`` with the lowest ``scores`` (ties: the earlier one)."""
    lowest = where[torch.sort(scores[where].detach(), stable=True).indices]  # [n], lowest first
    return lowest[: math.floor(len(where) * share)]


def reference_logits(model, embeds: torch.Tensor, mask: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Before layer l, each row's image slots are ranked by that layer's router on the layer's input; the lowest
    ``floor((1 - r_l) * n)`` have their MLP output zeroed, and the chosen ones' is ``f * (1 + g - g.detach())``."""
    policy = router(model)

    def gate_of(i: int, h: torch.Tensor) -> torch.Tensor:
        scores = policy.routers[i](h).squeeze(-1).float()  # [B, T]
        gate = torch.ones_like(scores)  # [B, T]: 0 skipped, 1 + g - g.detach() chosen, 1 text
        for b in range(h.shape[0]):
            where = slots[b].nonzero().flatten()  # [n]
            skipped = lowest_by_hand(scores[b], where, 1 - RATIOS[i])
            g = torch.sigmoid(scores[b, where])
            gate = gate.index_put((torch.full_like(where, b), where), 1 + g - g.detach())
            gate = gate.index_put((torch.full_like(skipped, b), skipped), torch.zeros(len(skipped)))
        return gate

    return layer_loop_logits(model, embeds, mask, gate_of)


def test_the_shifted_cosine_schedule_and_its_errors() -> None:
    want = [0.25 + 0.75 * (1 + math.cos(math.pi * k / 4)) / 2 for k in (1, 2, 3, 4)]
    assert shifted_cosine(4, 0.25) == pytest.approx(want) and want[-1] == pytest.approx(0.25)
    assert shifted_cosine(4, 0.25)[0] == pytest.approx(0.25 + 0.75 * 0.8535533905932737)
    policy = SKIP_POLICIES.build({"name": "mod_router"}, dim=8, num_layers=4)
    assert policy.ratios == pytest.approx(want) and len(policy.routers) == 4
    for bad, message in (
        ({"mode": "attention"}, "mode must be one of ffn, layer"),
        ({"ratios": [0.5, 0.5]}, "must be 4 keep ratios in"),
        ({"ratios": [0.5, 0.0, 1.0, 1.0]}, "must be 4 keep ratios in"),
        ({"min_ratio": 0.0}, "min_ratio"),
    ):
        with pytest.raises(ValueError, match=f"mod_router: .*{message}"):
            SKIP_POLICIES.build({"name": "mod_router", **bad}, dim=8, num_layers=4)


def test_training_logits_loss_and_router_gradients_equal_the_layer_loop(tokenizer) -> None:  # noqa: F811
    model = build(tokenizer, {"name": "mod_router", "ratios": RATIOS}).train()
    batch = make_batch(tokenizer, model)  # one image, two images, text only
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    out = model(ids, mask, batch["pixel_values"], batch["num_images"], labels)
    out.loss.backward()
    ours = {n: p.grad.clone() for n, p in router(model).named_parameters()}
    model.zero_grad(set_to_none=True)

    embedded = model.embed(ids, batch["pixel_values"], batch["num_images"])
    reference = reference_logits(model, embedded.embeds, mask, embedded.visual_slots)
    loss = next_token_loss(reference, labels)
    loss.backward()
    theirs = {n: p.grad for n, p in router(model).named_parameters()}
    assert (out.logits - reference).abs().max().item() < 1e-5
    assert abs(out.loss.item() - loss.item()) < 1e-6
    assert ours.keys() == theirs.keys()
    for name, grad in ours.items():
        torch.testing.assert_close(grad, theirs[name], atol=1e-6, rtol=1e-4, msg=name)
    # Trained through the chosen outputs (layer 2 keeps every image token: all chosen, all gated). The last layer's
    # image outputs reach no labelled prediction (no later layer mixes them into the text), so its router gets none.
    assert [bool(ours[f"routers.{i}.weight"].any()) for i in range(4)] == [True, True, True, False]


@pytest.mark.parametrize("mode", ["ffn", "layer"])
def test_a_text_only_batch_still_calls_every_router(tokenizer, mode: str) -> None:  # noqa: F811
    """SPMD: without images the routers still run and get (zero) gradients, so DDP sees every parameter used."""
    model = build(tokenizer, {"name": "mod_router", "ratios": RATIOS, "mode": mode}).train()
    batch = make_batch(tokenizer, model)
    row = slice(2, 3)  # the text-only sample
    out = model(batch["input_ids"][row], batch["attention_mask"][row], None, torch.tensor([0]), batch["labels"][row])
    out.loss.backward()
    grads = [p.grad for p in router(model).parameters()]
    assert all(g is not None and not g.any() for g in grads)


def test_generation_equals_the_full_sequence_forward(tokenizer) -> None:  # noqa: F811
    """Prefill routes the prompt's image tokens per layer and keeps the whole cache; each decode step's logits equal
    the eval forward over the prompt plus the tokens generated so far (the image slots' hidden states, and so every
    layer's choice, do not depend on later tokens)."""
    model = build(tokenizer, {"name": "mod_router", "ratios": RATIOS}).eval()
    generator = VLMGenerator(model, tokenizer)
    image = Image.new("RGB", (32, 32), (200, 30, 30))
    config = GenerationConfig(max_new_tokens=4, output_logits=True)
    [answer] = generator.generate([Request("What colour is the circle?", image)], config)
    assert answer.stats.kv_bytes_kept == answer.stats.kv_bytes_prefill  # nothing leaves the cache
    [prompt] = generator.encode([Request("What colour is the circle?", image)])
    ids = torch.tensor([list(prompt.ids) + answer.token_ids[:3]])  # [1, P + 3]
    with torch.no_grad():
        full = model(ids, torch.ones_like(ids), prompt.pixels[None], torch.tensor([1])).logits[0, -4:]  # [4, V]
    assert (answer.logits - full).abs().max().item() < 1e-4
    assert answer.logits.argmax(-1).tolist() == answer.token_ids


def test_cost_schedule_by_hand() -> None:
    """12 text tokens and one image of 16 slots, 4 layers with RATIOS: 16 * (1 - r) image tokens skip the FFN."""
    policy = f"model.skip.policy={{name: mod_router, ratios: {RATIOS}}}"
    overrides = ["model.backbone.config.num_hidden_layers=4", policy]
    model = build_meta_model(str(BENCH), overrides)
    want = TokenSchedule(tuple(LayerTokens(28, 28 - s, routed=28) for s in (4, 8, 0, 12)), cached=28)
    assert model_schedule(model, 12) == want == model_schedule(model, 12, training=True)
    two = model_schedule(model, 12, images=2)
    assert [layer.present - layer.ffn for layer in two.layers] == [8, 16, 0, 24] and two.cached == 44


def test_fit_and_generate_through_the_cli(tiny_overrides: list[str], tmp_path: Path) -> None:
    """Two training steps; the routers are saved with the run and ``generate`` loads them and answers."""
    policy = ["model.skip.policy={name: mod_router, min_ratio: 0.5}"]
    done = fit_and_generate([*tiny_overrides, *policy], tmp_path, TIMEOUT_S)
    run = done.run
    assert done.losses and all(math.isfinite(x) for x in done.losses), done.fit_log
    gen = VLMGenerator.from_checkpoint(run)
    [answer] = gen.generate([Request(PROMPT, done.image)], GenerationConfig(max_new_tokens=3))
    assert answer.text is not None and answer.text in done.generated
    saved = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    routers = {k: v for k, v in saved.items() if ".policy.routers." in k}
    assert len(routers) == 2 * 2  # weight and bias of the tiny recipe's 2 decoder layers
    loaded = dict(gen.model.visual.policy.named_parameters())
    assert all(torch.equal(v, loaded[k.split(".policy.", 1)[1]]) for k, v in routers.items())


@pytest.mark.parametrize("mode", ["ffn", "layer"])
def test_activation_checkpointing_recomputes_the_same_routes(tokenizer, mode: str) -> None:  # noqa: F811
    """The hooks stay attached after the forward, so a layer recomputed in the backward meets the FFN plan and gate
    it ran with (the routing pre-hooks run outside the checkpointed forward): loss and every gradient equal those
    without checkpointing."""
    model = build(tokenizer, {"name": "mod_router", "ratios": RATIOS, "mode": mode}).train()
    batch = make_batch(tokenizer, model)
    args = (batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["num_images"], batch["labels"])

    def step() -> tuple[float, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        out = model(*args)
        out.loss.backward()
        return out.loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain_loss, plain = step()
    model.backbone.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    loss, grads = step()
    assert loss == plain_loss and grads.keys() == plain.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain[name], atol=1e-6, rtol=1e-5, msg=name)


def test_a_training_steps_measured_flops_equal_the_schedules(tokenizer) -> None:  # noqa: F811
    """Forward and backward of the LLM on one prompt with one image: the routers count as trained linear layers
    (forward, input and weight gradients), the FFN only on each layer's chosen rows (or, in layer mode, each layer
    only on them), the LM head on every position; the full model and PyramidDrop alongside."""
    mod_router = {"name": "mod_router", "ratios": RATIOS}
    pyramid_drop = {"name": "pyramid_drop", "layers": [1, 3]}  # the LM head sees every position after the drops
    for policy in ({"name": "none"}, mod_router, {**mod_router, "mode": "layer"}, pyramid_drop):
        model = build(tokenizer, policy).train()
        batch = make_batch(tokenizer, model)
        n = int(batch["attention_mask"][0].sum())  # row 0 without its right padding
        ids, mask, labels = batch["input_ids"][:1, :n], batch["attention_mask"][:1, :n], batch["labels"][:1, :n]
        embedded = model.embed(ids, batch["pixel_values"][:1], torch.tensor([1]))
        embedded.embeds = embedded.embeds.detach().requires_grad_()  # the LLM's step alone, inputs trainable
        measured = measured_flops(partial(training_step, model, embedded, mask, labels))
        schedule = model_schedule(model, n - model.num_image_tokens, training=True)
        assert measured == train_step_flops(LLMShape.from_config(model.backbone.config), schedule), policy


def training_step(model, embedded, mask: torch.Tensor, labels: torch.Tensor) -> None:
    """The LLM's forward over ``embedded`` with the method's steps, and the loss's backward."""
    positions = positions_from_mask(mask)
    with method_steps(model, embedded, mask, positions, labels):
        logits = model.run_backbone(embedded, mask, positions).logits
    next_token_loss(logits, labels).backward()
