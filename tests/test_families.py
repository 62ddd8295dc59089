"""Every supported decoder family, each with the same tests (docs/adapters.md): no-skip parity with plain HF,
Skip-FFN against a two-stream reference, KV-removal decoding against a masked no-cache reference (sliding and
hybrid caches, prompts longer than the window), and FastV against a reference whose later layers never see the
dropped tokens. Tiny random fp32 models from each adapter's config, CPU, nothing downloaded."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers import AutoConfig, DynamicCache
from transformers.cache_utils import DynamicSlidingWindowLayer

from skipvision.adapters import adapter_for, supported_model_types
from skipvision.errors import UnsupportedModelError
from skipvision.inference.generate import Decoder
from skipvision.inference.kv import Removal, drop_cache_positions, prune_mask
from skipvision.model import positions_from_mask
from skipvision.skip.fastv import fastv_prefill, last_token_attention
from skipvision.skip.ffn import SkipFFN

from .families import FAMILIES, VOCAB, allowed, eager_twin, reference_logits, tiny_lm, windows

B, T, STEPS = 2, 14, 4


def test_the_tested_list_is_every_adapter() -> None:
    assert sorted(FAMILIES) == supported_model_types()


def test_an_unsupported_family_fails_in_one_line_naming_the_supported_ones() -> None:
    config = AutoConfig.for_model("gpt2", n_layer=1, n_embd=32, n_head=2)
    with pytest.raises(UnsupportedModelError) as err:
        adapter_for(config)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("model_type 'gpt2' is not supported")
    assert all(name in message for name in FAMILIES)


def prompt_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts of real lengths 11 and 14, left-padded to T = 14: ids, mask [B, T]."""
    ids = torch.randint(3, VOCAB, (B, T), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, :3] = 0
    ids[0, :3] = 0
    return ids, mask


def skip_plan() -> torch.Tensor:
    """[B, T] bool, False at an image-like span per row (different counts: row 1 keeps masked fillers)."""
    keep = torch.ones(B, T, dtype=torch.bool)
    keep[0, 5:9] = False
    keep[1, [3, 4, 6, 7, 9]] = False
    return keep


@pytest.mark.parametrize("family", FAMILIES)
def test_keep_everything_plan_is_bit_identical_to_plain_hf(family: str) -> None:
    model = tiny_lm(family)
    ids, mask = prompt_batch()
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
        with SkipFFN(model) as skip:
            skip.set_plan(torch.ones(B, T, dtype=torch.bool))
            hooked = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(hooked, plain)


@pytest.mark.parametrize("family", FAMILIES)
def test_skip_ffn_equals_the_two_stream_reference(family: str) -> None:
    """Skip-FFN packs the kept rows into the MLP; the reference runs the MLP on every row and keeps its output only
    where the plan says FFN (zeros elsewhere): the same function computed another way."""
    model = tiny_lm(family)
    ids, mask = prompt_batch()
    plan = skip_plan()
    layers = adapter_for(model.config).layers(model)
    rows: list[int] = []
    first_linears = [next(m for m in layer.mlp.modules() if isinstance(m, nn.Linear)) for layer in layers]
    counting = [
        lin.register_forward_pre_hook(lambda _m, a: rows.append(a[0].shape[:-1].numel())) for lin in first_linears
    ]
    with torch.no_grad(), SkipFFN(model) as skip:
        skip.set_plan(plan)
        ours = model(input_ids=ids, attention_mask=mask).logits
    for handle in counting:
        handle.remove()
    assert rows == [int(plan.sum())] * len(layers)

    gate = plan[..., None].float()  # [B, T, 1]
    zeroing = [layer.mlp.register_forward_hook(lambda _m, _a, out: out * gate) for layer in layers]
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask).logits
        for handle in zeroing:
            handle.remove()
        plain = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert (ours - reference)[real].abs().max().item() < 1e-5
    assert (ours - plain)[real].abs().max().item() > 1e-3  # non-vacuous


def decode(model, ids, mask, keep: torch.Tensor | None, steps: int = STEPS):
    """Prefill, remove the positions where ``keep`` is False (None: nothing), decode ``steps`` greedy steps with
    the generation loop's decoder (its masks and true positions). Returns the prefill's last logits [B, V], the
    step inputs [B, steps], the step logits [B, steps, V] and the cache."""
    cache = DynamicCache(config=model.config)
    positions = positions_from_mask(mask)  # [B, T]
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
    key_pos, key_mask = positions, mask
    if keep is not None:
        removal = Removal.plan(keep)
        drop_cache_positions(cache, removal)
        key_pos, key_mask = positions.gather(1, removal.index), prune_mask(mask, removal)
    decoder = Decoder(model, cache, key_mask, key_pos, positions[:, -1:] + 1)
    token = out.logits[:, -1].argmax(-1)  # [B]
    tokens, logits = [], []
    for _ in range(steps):
        tokens.append(token)
        with torch.no_grad():
            logits.append(decoder(token))
        token = logits[-1].argmax(-1)
    return out.logits[:, -1], torch.stack(tokens, 1), torch.stack(logits, 1), cache


def removal_reference(model, ids, mask, tokens, hidden: torch.Tensor | None) -> torch.Tensor:
    """Logits [B, T + steps, V] with no cache: every layer causal by position, windowed where sliding, and the
    generated tokens' queries blind to the ``hidden`` [B, T] prompt positions."""
    full_ids = torch.cat([ids, tokens], 1)
    valid = torch.cat([mask, torch.ones_like(tokens)], 1)
    positions = positions_from_mask(valid)
    embeds = model.get_input_embeddings()(full_ids)
    masks = []
    for window in windows(model):
        see = allowed(positions, valid, window)
        if hidden is not None:
            see[:, T:, :T] &= ~hidden[:, None, :]
        masks.append(see)
    return reference_logits(model, embeds, positions, masks)


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_removal_decoding_equals_the_masked_no_cache_reference(family: str) -> None:
    model = tiny_lm(family)
    ref = eager_twin(model)
    ids, mask = prompt_batch()
    keep = skip_plan()
    first, tokens, steps, cache = decode(model, ids, mask, keep)

    expected = removal_reference(ref, ids, mask, tokens, ~keep)
    assert (first - expected[:, T - 1]).abs().max().item() < 1e-4
    assert (steps - expected[:, T:]).abs().max().item() < 1e-4
    unhidden = removal_reference(ref, ids, mask, tokens, None)
    assert (steps - unhidden[:, T:]).abs().max().item() > 1e-3  # non-vacuous: the removal matters

    # The cache really shrank: full layers hold T - min(drops) + steps columns, sliding ones at most window - 1.
    kept = T - int((~keep).sum(-1).min())
    for layer, window in zip(cache.layers, windows(model), strict=True):
        if isinstance(layer, DynamicSlidingWindowLayer):
            assert layer.keys.shape[2] <= min(window - 1, kept + STEPS)
        else:
            assert layer.keys.shape[2] == kept + STEPS


@pytest.mark.parametrize("family", FAMILIES)
def test_decoding_without_removal_equals_plain_hf(family: str) -> None:
    model = tiny_lm(family)
    ids, mask = prompt_batch()
    first, tokens, steps, _ = decode(model, ids, mask, None)
    full_ids = torch.cat([ids, tokens], 1)
    valid = torch.cat([mask, torch.ones_like(tokens)], 1)
    with torch.no_grad():
        plain = model(input_ids=full_ids, attention_mask=valid, position_ids=positions_from_mask(valid)).logits
    assert (first - plain[:, T - 1]).abs().max().item() < 1e-4
    assert (steps - plain[:, T:]).abs().max().item() < 1e-4


def fastv_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Embeddings [2, 16, 64], left-padded mask and image slots: 6 slots in row 0, 9 (two images) in row 1."""
    embeds = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[0, :2] = 0
    slots = torch.zeros(2, 16, dtype=torch.bool)
    slots[0, 4:10] = True
    slots[1, [2, 3, 4, 5, 8, 9, 10, 11, 12]] = True
    return embeds, mask, slots


@pytest.mark.parametrize("family", FAMILIES)
def test_fastv_equals_a_reference_whose_later_layers_never_see_the_dropped_tokens(family: str) -> None:
    layer_k, ratio = 2, 0.5
    model = tiny_lm(family)
    ref = eager_twin(model)
    adapter = adapter_for(model.config)
    embeds, mask, slots = fastv_batch()
    length = mask.shape[1]
    positions = positions_from_mask(mask)

    # The attention row equals the eager model's weights of the last query in layer K - 1.
    seen = {}
    hook = adapter.layers(ref)[layer_k - 1].register_forward_pre_hook(
        lambda _m, a, kw: seen.update(x=a[0], rope=kw["position_embeddings"]), with_kwargs=True
    )
    with torch.no_grad():
        eager = ref(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, output_attentions=True)
        hook.remove()
        row = last_token_attention(adapter, adapter.layers(ref)[layer_k - 1], seen["x"], seen["rope"], mask)
    weights = eager.attentions[layer_k - 1][:, :, -1].mean(1)  # [B, T]
    assert (row - weights).abs().max().item() < 1e-5

    cache = DynamicCache(config=model.config)
    out = fastv_prefill(model, embeds, mask, positions, slots, cache, layer_k, ratio)
    dropped = torch.zeros_like(slots)
    for b in range(2):
        spots = slots[b].nonzero().flatten().tolist()
        worst = sorted(spots, key=lambda t: weights[b, t].item())[: math.floor(ratio * len(spots))]
        dropped[b, worst] = True
        assert out.removal.index[b][out.removal.valid[b]].tolist() == [t for t in range(length) if t not in worst]

    # Two decode steps over the reduced cache, with the generation loop's masks.
    token_ids = torch.tensor([[5, 7], [9, 11]])
    key_pos, key_mask = positions.gather(1, out.removal.index), prune_mask(mask, out.removal)
    decoder = Decoder(model, cache, key_mask, key_pos, positions[:, -1:] + 1)
    with torch.no_grad():
        steps = [decoder(token_ids[:, j]) for j in range(2)]

    full = torch.cat([embeds, model.get_input_embeddings()(token_ids)], 1)  # [B, T + 2, D]
    valid = torch.cat([mask, torch.ones_like(token_ids)], 1)
    pos = positions_from_mask(valid)
    hidden = torch.cat([dropped, torch.zeros_like(token_ids, dtype=torch.bool)], 1)  # [B, T + 2]
    masks = []
    for i, window in enumerate(windows(ref)):
        see = allowed(pos, valid, window)
        see[:, length:] &= ~hidden[:, None, :]  # decoded tokens: the dropped ones are gone from every cache layer
        if i >= layer_k:
            see &= ~hidden[:, None, :]  # layers >= K: nobody sees them
        masks.append(see | torch.eye(see.shape[-1], dtype=torch.bool))
    expected = reference_logits(ref, full, pos, masks)
    assert (out.logits - expected[:, length - 1]).abs().max().item() < 1e-4
    assert (torch.stack(steps, 1) - expected[:, length:]).abs().max().item() < 1e-4
