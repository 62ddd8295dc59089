"""Skip-FFN with a per-layer plan (docs/method.md "The Skip-FFN layer"): different rows skipped in different layers,
compared with a hand-written loop over the decoder layers whose MLP outputs are zeroed on each layer's skipped rows
(logits and gradients), the [B, T] form against a mapping of every layer, errors, decode steps, gradient
checkpointing, copies. A tiny random Llama, fp32, CPU; the logits equality on every supported family at the end."""

from __future__ import annotations

import copy
import pickle
from collections.abc import Callable

import pytest
import torch
from torch import nn
from transformers.masking_utils import create_causal_mask

from skipvision.adapters import adapter_for
from skipvision.skip.ffn import SkipFFN

from .families import FAMILIES
from .families import tiny_lm as family_lm
from .test_skip_ffn import B, T, decode_step_under_plan, input_ids, mlp_row_counts, tiny_lm

LAYERS = 5


def per_layer_plan() -> dict[int, torch.Tensor]:
    """{layer: [B, T] bool}: different rows in layers 0 and 2, every row kept in 1, none in 3 (named as -2), and
    layer 4 left out (plain MLP)."""
    first = torch.ones(B, T, dtype=torch.bool)  # [B, T]
    first[0, 4:9] = False
    first[1, [4, 6, 8]] = False
    third = torch.ones(B, T, dtype=torch.bool)  # [B, T]
    third[0, [1, 2, 10]] = False
    third[1, 5:11] = False
    return {0: first, 1: torch.ones(B, T, dtype=torch.bool), 2: third, -2: torch.zeros(B, T, dtype=torch.bool)}


def layer_loop_logits(model: nn.Module, embeds: torch.Tensor, plan: dict[int, torch.Tensor]) -> torch.Tensor:
    """Logits [B, T, V] of the plain Llama written out layer by layer: each decoder layer is called with its MLP's
    output multiplied by that layer's mask (the MLP runs on every row; zeros on the skipped ones)."""
    inner = model.model
    n = len(inner.layers)
    gates = {i % n: mask[..., None].float() for i, mask in plan.items()}  # layer -> [B, T, 1]
    position_ids = torch.arange(T).expand(B, T)  # [B, T]
    kwargs = {
        "attention_mask": create_causal_mask(model.config, embeds, None, None, position_ids),
        "position_ids": position_ids,
        "position_embeddings": inner.rotary_emb(embeds, position_ids),
    }
    h = embeds  # [B, T, D]
    for i, layer in enumerate(inner.layers):
        handle = None
        if i in gates:
            handle = layer.mlp.register_forward_hook(lambda _m, _a, out, gate=gates[i]: out * gate)
        h = layer(h, **kwargs)  # [B, T, D]
        if handle is not None:
            handle.remove()
    return model.lm_head(inner.norm(h))  # [B, T, V]


def test_per_layer_plan_equals_the_layer_loop_reference_in_logits_and_gradients() -> None:
    model = tiny_lm(layers=LAYERS)
    plan = per_layer_plan()
    embeds = model.get_input_embeddings()(input_ids()).detach()  # [B, T, D]

    def run(forward: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        x = embeds.clone().requires_grad_()  # [B, T, D]
        logits = forward(x)  # [B, T, V]
        logits.square().mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return logits.detach(), {"inputs_embeds": x.grad, **grads}

    with SkipFFN(model) as skip:
        skip.set_plan(plan)
        with mlp_row_counts(model) as counts:
            ours, our_grads = run(lambda x: model(inputs_embeds=x, use_cache=False).logits)
    reference, ref_grads = run(lambda x: layer_loop_logits(model, x, plan))
    plain = model(inputs_embeds=embeds).logits.detach()  # [B, T, V]

    n0, n2 = int(plan[0].sum()), int(plan[2].sum())
    assert counts == {0: [n0], 1: [B * T], 2: [n2], 3: [0], 4: [B * T]}  # all kept and left out: unpacked
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)
    assert (ours - plain).abs().max() > 1e-3  # non-vacuous
    assert our_grads.keys() == ref_grads.keys()
    assert our_grads["model.layers.3.mlp.up_proj.weight"].abs().sum() == 0  # no kept row: no MLP gradient
    for name, g in ref_grads.items():
        torch.testing.assert_close(our_grads[name], g, rtol=1e-5, atol=1e-6, msg=name)


def test_one_mask_equals_a_mapping_of_every_hooked_layer_and_shares_its_indices() -> None:
    model = tiny_lm(layers=LAYERS)
    mask = per_layer_plan()[0]
    ids = input_ids()
    with torch.no_grad(), SkipFFN(model, layers=[1, -1]) as skip:
        skip.set_plan(mask)
        flat = model(input_ids=ids).logits  # [B, T, V]
        assert skip._plans[1].keep is skip._plans[4].keep  # computed once for both layers
        skip.set_plan({1: mask, 4: mask})
        mapped = model(input_ids=ids).logits  # [B, T, V]
        assert skip._plans[1].keep is skip._plans[4].keep
        skip.set_plan({1: mask, 4: mask.clone()})  # equal but distinct masks: one packing each
        assert skip._plans[1].keep is not skip._plans[4].keep
        assert torch.equal(model(input_ids=ids).logits, flat)
    assert torch.equal(mapped, flat)


def test_decode_steps_run_the_plain_mlp_under_a_per_layer_plan() -> None:
    counts, hooked, plain = decode_step_under_plan(tiny_lm(layers=LAYERS), per_layer_plan())
    assert counts == {i: [B] for i in range(LAYERS)}
    assert torch.equal(hooked, plain)


def test_gradient_checkpointing_replays_each_layers_rows() -> None:
    model = tiny_lm(layers=LAYERS).train()
    plan = per_layer_plan()
    model.activation_checkpointing_enable()
    with SkipFFN(model) as skip, mlp_row_counts(model) as counts:
        skip.set_plan(plan)
        model(input_ids=input_ids(), use_cache=False).logits.square().mean().backward()
    n0, n2 = int(plan[0].sum()), int(plan[2].sum())
    assert counts == {0: [n0, n0], 1: [B * T] * 2, 2: [n2, n2], 3: [0, 0], 4: [B * T] * 2}  # forward + recompute


def test_copies_follow_their_own_per_layer_plan() -> None:
    model = tiny_lm(layers=LAYERS)
    skip = SkipFFN(model).attach()
    ids = input_ids()
    with torch.no_grad():
        skip.set_plan(per_layer_plan())
        want = model(input_ids=ids).logits  # [B, T, V]
        twins = [copy.deepcopy((model, skip)), pickle.loads(pickle.dumps((model, skip)))]
        skip.set_plan(None)
        for twin, twin_skip in twins:
            assert torch.equal(twin(input_ids=ids).logits, want)
            twin_skip.set_plan({0: per_layer_plan()[2]})  # the copy's layer 0 now follows layer 2's rows
            with mlp_row_counts(twin) as counts:
                twin(input_ids=ids)
            assert counts == {0: [int(per_layer_plan()[2].sum())], **{i: [B * T] for i in range(1, LAYERS)}}


def test_per_layer_plan_errors_name_the_hooked_layers_and_keep_the_previous_plan() -> None:
    model = tiny_lm(layers=LAYERS)
    skip = SkipFFN(model, layers=[0, 2])
    ok = torch.ones(B, T, dtype=torch.bool)
    skip.set_plan({0: per_layer_plan()[0]})
    before = skip._plans
    for index in (1, 5, -6, -4):  # -4 is layer 1
        with pytest.raises(ValueError, match=rf"decoder layer {index}, which this SkipFFN does not hook: "):
            skip.set_plan({index: ok})
    with pytest.raises(ValueError, match=r"hooked layers are \[0, 2\] \(the model has 5\)"):
        skip.set_plan({0: ok, 3: ok})
    with pytest.raises(ValueError, match=r"names decoder layer 2 twice \(-3 resolves to it\)"):
        skip.set_plan({2: ok, -3: ok})
    with pytest.raises(ValueError, match=r"ffn_mask for decoder layer 2 must be a \[B, T\] bool tensor"):
        skip.set_plan({0: ok, -3: ok[..., None]})
    with pytest.raises(ValueError, match=r"ffn_mask for decoder layer 0 must be a \[B, T\] bool tensor"):
        skip.set_plan({0: ok.float()})
    with pytest.raises(TypeError, match="a mapping"):
        skip.set_plan([ok, ok])
    assert skip._plans is before
    skip.set_plan({-3: ok, 0: ok})  # every row kept: both layers run the plain MLP
    assert skip._plans == {}


@pytest.mark.parametrize("family", FAMILIES)
def test_per_layer_plan_on_every_family(family: str) -> None:
    """The first and last layers skip different rows; the reference runs every MLP on every row and multiplies its
    output by that layer's mask."""
    model = family_lm(family)
    ids = input_ids()
    first, third = per_layer_plan()[0], per_layer_plan()[2]
    adapter = adapter_for(model.config)
    layers = adapter.layers(model)
    with torch.no_grad(), SkipFFN(model) as skip:
        skip.set_plan({0: first, -1: third})
        ours = model(input_ids=ids).logits  # [B, T, V]
    gates = {0: first[..., None].float(), len(layers) - 1: third[..., None].float()}  # layer -> [B, T, 1]
    zeroing = [
        adapter.mlp(layers[i]).register_forward_hook(lambda _m, _a, out, gate=gate: out * gate)
        for i, gate in gates.items()
    ]
    with torch.no_grad():
        reference = model(input_ids=ids).logits  # [B, T, V]
        for handle in zeroing:
            handle.remove()
        plain = model(input_ids=ids).logits  # [B, T, V]
    assert len(layers) >= 2
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)
    assert (ours - plain).abs().max() > 1e-3  # non-vacuous
