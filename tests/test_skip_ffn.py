"""Skip-FFN mechanics on an unmodified HF causal LM (docs/method.md "The Skip-FFN layer"): row packing, gradients,
detaching, deep copies, decode steps, gradient checkpointing, errors. A tiny random Llama, fp32, CPU; the same
equalities on every supported family are in tests/test_families.py.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, DynamicCache
from transformers.masking_utils import create_causal_mask

from skipvision.adapters import decoder_layers
from skipvision.errors import UnsupportedModelError
from skipvision.skip.ffn import SkipFFN

from .conftest import tiny_lm_config

B, T = 2, 12


def tiny_lm(model_type: str = "llama", attn: str = "sdpa", layers: int = 2) -> nn.Module:
    """A tiny random causal LM of ``model_type`` in eval mode (fp32, fixed seed)."""
    torch.manual_seed(0)
    cfg = tiny_lm_config(model_type, num_hidden_layers=layers)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=attn).eval()


def input_ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 97, (B, T), generator=torch.Generator().manual_seed(seed))  # [B, T]


def image_plan() -> torch.Tensor:
    """[B, T] bool: an image-like span at positions 3..9 whose tokens 4..8 skip the FFN (different per sample)."""
    mask = torch.ones(B, T, dtype=torch.bool)  # [B, T]
    mask[0, 4:9] = False
    mask[1, [4, 6, 8]] = False
    return mask


@contextmanager
def mlp_row_counts(model: nn.Module) -> Iterator[dict[int, list[int]]]:
    """Record, per decoder layer, the number of rows each call of ``mlp.gate_proj`` receives."""
    counts: dict[int, list[int]] = {}
    handles = []
    for i, layer in enumerate(decoder_layers(model)):
        counts[i] = []

        def pre_hook(_: nn.Module, args: tuple[torch.Tensor, ...], i: int = i) -> None:
            counts[i].append(args[0].shape[:-1].numel())

        handles.append(layer.mlp.gate_proj.register_forward_pre_hook(pre_hook))
    try:
        yield counts
    finally:
        for h in handles:
            h.remove()


@contextmanager
def zero_mlps(model: nn.Module) -> Iterator[None]:
    """Residual-only reference: every MLP's output replaced by zeros (it still runs)."""
    handles = [
        layer.mlp.register_forward_hook(lambda _m, _a, out: torch.zeros_like(out)) for layer in decoder_layers(model)
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def capture_layer(layer: nn.Module) -> Iterator[dict[str, object]]:
    """Capture a decoder layer's input hidden states, keyword arguments and output on its next call."""
    seen: dict[str, object] = {}

    def pre_hook(_: nn.Module, args: tuple, kwargs: dict) -> None:
        seen["x"], seen["kwargs"] = args[0], dict(kwargs)

    def hook(_: nn.Module, args: tuple, kwargs: dict, out: torch.Tensor) -> None:
        seen["out"] = out

    handles = [
        layer.register_forward_pre_hook(pre_hook, with_kwargs=True),
        layer.register_forward_hook(hook, with_kwargs=True),
    ]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_keep_everything_is_bit_identical(attn: str) -> None:
    model = tiny_lm("llama", attn)
    ids = input_ids()
    with torch.no_grad():
        ref = model(input_ids=ids).logits  # [B, T, V]
        with SkipFFN(model) as skip:
            skip.set_plan(torch.ones(B, T, dtype=torch.bool))
            shapes = []
            handle = decoder_layers(model)[0].mlp.gate_proj.register_forward_pre_hook(
                lambda _, args: shapes.append(tuple(args[0].shape[:-1]))
            )
            out = model(input_ids=ids).logits  # [B, T, V]
            handle.remove()
    assert shapes == [(B, T)]  # unpacked: a keep-everything plan costs no gather/scatter
    assert torch.equal(out, ref)


def test_skipped_rows_carry_attention_residual_only() -> None:
    model = tiny_lm()
    layer = decoder_layers(model)[1]
    plan = image_plan()
    with torch.no_grad(), SkipFFN(model, layers=[1]) as skip:
        skip.set_plan(plan)
        with capture_layer(layer) as seen:
            model(input_ids=input_ids(), use_cache=False)
        x, kwargs, hooked = seen["x"], seen["kwargs"], seen["out"]
        skip.set_plan(None)
        normal = layer(x, **kwargs)  # [B, T, D] full layer
        with zero_mlps(model):
            residual_only = layer(x, **kwargs)  # [B, T, D] h + Attn(Norm_in(h)) only
    assert not torch.allclose(normal[~plan], residual_only[~plan])  # the MLP matters on these rows
    assert torch.equal(hooked[~plan], residual_only[~plan])
    torch.testing.assert_close(hooked[plan], normal[plan], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layers", [None, [0]])
def test_mlp_sees_exactly_the_planned_rows(layers: list[int] | None) -> None:
    model = tiny_lm()
    plan = image_plan()
    with torch.no_grad(), SkipFFN(model.model, layers=layers) as skip:  # the base model works too
        skip.set_plan(plan)
        with mlp_row_counts(model) as counts:
            model(input_ids=input_ids())
    n_keep = int(plan.sum())
    assert n_keep < B * T
    expected = {0: [n_keep], 1: [n_keep]} if layers is None else {0: [n_keep], 1: [B * T]}
    assert counts == expected


def test_gradients_reach_skipped_tokens_through_attention() -> None:
    model = tiny_lm()
    plan = image_plan()
    embeds = model.get_input_embeddings()(input_ids()).detach().requires_grad_()  # [B, T, D]
    with SkipFFN(model) as skip:
        skip.set_plan(plan)
        model(inputs_embeds=embeds).logits[:, -1].sum().backward()
    per_token = embeds.grad.abs().sum(-1)  # [B, T]
    assert (per_token[~plan] > 0).all()
    for layer in decoder_layers(model):
        for proj in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
            assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_matches_two_stream_reference_layer(attn: str) -> None:
    """The hooked layer equals docs/method.md "The Skip-FFN layer" written out with the layer's own submodules."""
    model = tiny_lm("llama", attn)
    layer = decoder_layers(model)[0]
    ffn = image_plan()
    torch.manual_seed(2)
    x = torch.randn(B, T, model.config.hidden_size)  # [B, T, D]
    position_ids = torch.arange(T).expand(B, T)  # [B, T]
    kwargs = {
        "attention_mask": create_causal_mask(model.config, x, None, None, position_ids),
        "position_ids": position_ids,
        "position_embeddings": model.model.rotary_emb(x, position_ids),
    }
    with torch.no_grad():
        h = x + layer.self_attn(layer.input_layernorm(x), **kwargs)[0]  # [B, T, D] all tokens attend
        k = h[ffn]  # [n_keep, D] pack the FFN rows
        ref = h.clone()  # [B, T, D]
        ref[ffn] = k + layer.mlp(layer.post_attention_layernorm(k))  # FFN on the kept rows only
        with SkipFFN(model, layers=[0]) as skip:
            skip.set_plan(ffn)
            out = layer(x, **kwargs)  # [B, T, D]
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_zero_kept_rows_still_calls_the_mlp() -> None:
    model = tiny_lm()
    ids = input_ids()
    with torch.no_grad():
        with zero_mlps(model):
            residual_only = model(input_ids=ids).logits  # [B, T, V]
        with SkipFFN(model) as skip:
            skip.set_plan(torch.zeros(B, T, dtype=torch.bool))
            with mlp_row_counts(model) as counts:
                out = model(input_ids=ids).logits  # [B, T, V]
    assert counts == {0: [0], 1: [0]}  # SPMD: called once per layer, with an empty input
    assert torch.equal(out, residual_only)


def test_detach_restores_the_model() -> None:
    model = tiny_lm()
    ids = input_ids()
    keys_before = list(model.state_dict())
    with torch.no_grad():
        ref = model(input_ids=ids).logits  # [B, T, V]
        skip = SkipFFN(model, layers=[-1])
        assert skip.attach() is skip and skip.attach() is skip  # idempotent
        assert list(model.state_dict()) == keys_before
        skip.set_plan(image_plan())
        assert not torch.equal(model(input_ids=ids).logits, ref)
        with pytest.raises(RuntimeError, match="another SkipFFN"):
            SkipFFN(model, layers=[0]).attach()
        skip.detach()
        after = model(input_ids=ids).logits  # [B, T, V], plan still set
    assert torch.equal(after, ref)
    assert all("forward" not in layer.mlp.__dict__ for layer in decoder_layers(model))
    assert list(model.state_dict()) == keys_before
    with SkipFFN(model) as again:  # re-attachable once the first one is gone
        assert again.attached
    assert not again.attached and "forward" not in decoder_layers(model)[0].mlp.__dict__


def test_a_deep_copy_follows_its_own_plan_and_weights() -> None:
    """EMA copies, benchmarks' variants: a copy's MLPs must use the copy's SkipFFN and weights, not the original's."""
    model = tiny_lm()
    skip = SkipFFN(model).attach()
    ids, plan = input_ids(), image_plan()
    with torch.no_grad():
        skip.set_plan(plan)
        want = model(input_ids=ids).logits
        twin = copy.deepcopy((model, skip))
        skip.set_plan(None)  # the original's plan no longer applies...
        assert torch.equal(twin[0](input_ids=ids).logits, want)  # ...the copy keeps its own
        for p in model.parameters():
            p.add_(1.0)  # the copy's weights are its own
        assert torch.equal(twin[0](input_ids=ids).logits, want)
        twin[1].set_plan(None)
        assert not torch.equal(twin[0](input_ids=ids).logits, want)


def decode_step_under_plan(model: nn.Module, plan: object) -> tuple[dict[int, list[int]], torch.Tensor, torch.Tensor]:
    """Prefill under ``plan``, then one decode step (T=1) with the plan still set and once with Skip-FFN detached
    from the same cache: (rows each MLP ran in the hooked step, hooked logits [B, 1, V], plain logits [B, 1, V])."""
    step = torch.tensor([[5], [7]])  # [B, 1]
    with torch.no_grad(), SkipFFN(model) as skip:
        skip.set_plan(plan)
        prefill = model(input_ids=input_ids(), cache=DynamicCache(config=model.config), use_cache=True)
        cache_copy = copy.deepcopy(prefill.cache)
        with mlp_row_counts(model) as counts:
            hooked = model(input_ids=step, cache=prefill.cache, use_cache=True).logits
        skip.detach()
        plain = model(input_ids=step, cache=cache_copy, use_cache=True).logits
    return counts, hooked, plain


def test_decode_step_runs_the_plain_mlp() -> None:
    counts, hooked, plain = decode_step_under_plan(tiny_lm(), image_plan())
    assert counts == {0: [B], 1: [B]}
    assert torch.equal(hooked, plain)


def test_gradient_checkpointing_replays_the_same_plan() -> None:
    model = tiny_lm().train()
    embeds = model.get_input_embeddings()(input_ids()).detach()  # [B, T, D]
    plan = image_plan()

    def grads() -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        model(inputs_embeds=embeds, use_cache=False).logits.square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    with SkipFFN(model) as skip:
        no_plan = grads()
        skip.set_plan(plan)
        reference = grads()
        model.activation_checkpointing_enable()  # `gradient_checkpointing_enable` is deprecated in transformers 5.x
        with mlp_row_counts(model) as counts:
            checkpointed = grads()
    n_keep = int(plan.sum())
    assert counts == {0: [n_keep, n_keep], 1: [n_keep, n_keep]}  # forward + recompute, same plan
    assert reference.keys() == checkpointed.keys() == no_plan.keys()
    assert not torch.allclose(
        reference["model.layers.0.mlp.up_proj.weight"], no_plan["model.layers.0.mlp.up_proj.weight"]
    )
    for name, g in reference.items():
        torch.testing.assert_close(checkpointed[name], g, rtol=1e-5, atol=1e-6, msg=name)


def test_layer_selection_and_errors() -> None:
    model = tiny_lm()
    assert SkipFFN(model, layers=[-1, 1]).layers == (1,)
    assert SkipFFN(model).layers == (0, 1)
    for bad in ([2], [-3]):
        with pytest.raises(ValueError, match=r"valid indices are -2\.\.1"):
            SkipFFN(model, layers=bad)
    with pytest.raises(UnsupportedModelError, match="Linear is not a transformers model"):
        decoder_layers(nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"\[B, T\] bool"):
        SkipFFN(model).set_plan(torch.ones(B, T))
