"""Physical removal of skipped K/V positions after prefill (docs/method.md "KV removal") on a tiny HF Llama."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from skipvision.inference.kv import Removal, drop_cache_positions, kv_cache_bytes, prune_mask
from skipvision.model import positions_from_mask

from .conftest import tiny_lm_config

PAD = 0
STEPS = 3


def _config(attn: str):
    cfg = tiny_lm_config("llama")
    cfg._attn_implementation = attn
    return cfg


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config("sdpa"), dtype=torch.float32).eval()
    ref = AutoModelForCausalLM.from_config(_config("eager"), dtype=torch.float32).eval()
    ref.load_state_dict(model.state_dict())
    return model, ref


@pytest.fixture(scope="module")
def batch():
    """Two left-padded prompts of real lengths 9 and 12 (P = 12), and 3 middle positions to drop in each."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 97, (2, 12), generator=gen)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :3] = 0
    ids[0, :3] = PAD
    keep = torch.ones(2, 12, dtype=torch.bool)
    keep[0, [6, 7, 8]] = False
    keep[1, [4, 5, 9]] = False
    return ids, mask, keep


def _prefill(model, ids, mask):
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model(
            input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask), cache=cache, use_cache=True
        )
    return out.logits, cache


def _decode(model, ids, mask, keep, compact_positions: bool = False):
    """Prefill, drop the positions where keep is False, decode STEPS greedy steps.

    Returns the generated tokens [B, STEPS] (the first from prefill) and the decode-step logits [B, STEPS, V]."""
    logits, cache = _prefill(model, ids, mask)
    true_next = positions_from_mask(mask)[:, -1:] + 1  # [B, 1]: the prompt's real length
    removal = Removal.plan(keep)
    drop_cache_positions(cache, removal)
    mask = prune_mask(mask, removal)  # [B, P - n_drop]
    # The pitfall: positions derived from the pruned mask's cumsum (or the pruned cache length) are compacted.
    next_pos = mask.sum(-1, keepdim=True) if compact_positions else true_next  # [B, 1]
    tokens, step_logits = [], []
    token = logits[:, -1].argmax(-1)  # [B]
    for _ in range(STEPS):
        tokens.append(token)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        with torch.no_grad():
            out = model(
                input_ids=token[:, None], attention_mask=mask, position_ids=next_pos, cache=cache, use_cache=True
            )
        step_logits.append(out.logits[:, -1])
        token = out.logits[:, -1].argmax(-1)
        next_pos = next_pos + 1
    return torch.stack(tokens, 1), torch.stack(step_logits, 1)


def _reference(ref, ids, mask, keep, tokens):
    """No-cache eager forward over prompt + generated tokens with a 4-D additive mask [B, 1, L, L].

    Causal + padding everywhere; the generated tokens' queries additionally do not see the dropped positions (the
    prompt's queries see everything, as in prefill). Positions: cumsum of the 2-D mask. Returns logits [B, L, V]."""
    batch, prompt_len = ids.shape
    full_ids = torch.cat([ids, tokens], 1)  # [B, L]
    full_mask = torch.cat([mask, torch.ones_like(tokens)], 1)  # [B, L]
    length = full_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()  # [L, L]
    allowed = causal[None] & full_mask.bool()[:, None, :]  # [B, L(q), L(k)]
    dropped = torch.cat([~keep, torch.zeros_like(tokens, dtype=torch.bool)], 1)  # [B, L]
    allowed[:, prompt_len:, :] &= ~dropped[:, None, :]
    additive = torch.zeros(batch, 1, length, length)
    additive.masked_fill_(~allowed[:, None], torch.finfo(torch.float32).min)  # [B, 1, L, L]
    with torch.no_grad():
        return ref(input_ids=full_ids, attention_mask=additive, position_ids=positions_from_mask(full_mask)).logits


def test_drop_shrinks_cache_and_keeps_entries(models, batch):
    model, _ = models
    ids, mask, keep = batch
    _, cache = _prefill(model, ids, mask)
    before = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
    bytes_before = kv_cache_bytes(cache)
    n_drop = int((~keep[0]).sum())
    drop_cache_positions(cache, Removal.plan(keep))
    for (keys, values), layer in zip(before, cache.layers, strict=True):
        b, h, t, hd = keys.shape
        assert layer.keys.shape == (b, h, t - n_drop, hd)
        assert layer.values.shape == (b, h, t - n_drop, hd)
        for row in range(b):
            assert torch.equal(layer.keys[row], keys[row][:, keep[row]])
            assert torch.equal(layer.values[row], values[row][:, keep[row]])
    assert cache.get_seq_length() == ids.shape[1] - n_drop
    assert kv_cache_bytes(cache) * ids.shape[1] == bytes_before * (ids.shape[1] - n_drop)
    pruned = prune_mask(mask, Removal.plan(keep))
    assert pruned.tolist() == [mask[row][keep[row]].tolist() for row in range(2)]


def test_decode_after_removal_matches_masked_reference(models, batch):
    model, ref = models
    ids, mask, keep = batch
    tokens, step_logits = _decode(model, ids, mask, keep)
    expected = _reference(ref, ids, mask, keep, tokens)[:, ids.shape[1] :]  # [B, STEPS, V]
    assert (step_logits - expected).abs().max().item() < 1e-4
    # Non-vacuous: the removal matters, the same steps with nothing hidden give other logits.
    unhidden = _reference(ref, ids, mask, torch.ones_like(keep), tokens)[:, ids.shape[1] :]
    assert (step_logits - unhidden).abs().max().item() > 1e-3


def test_compacted_positions_are_wrong(models, batch):
    """Pitfall (docs/method.md "KV removal"): positions from the pruned mask or cache length shift RoPE phases."""
    model, ref = models
    ids, mask, keep = batch
    tokens, step_logits = _decode(model, ids, mask, keep, compact_positions=True)
    expected = _reference(ref, ids, mask, keep, tokens)[:, ids.shape[1] :]
    assert (step_logits - expected).abs().max().item() > 1e-3


def test_unequal_drop_counts_keep_masked_fillers(models, batch):
    """Row 1 drops one more position than row 0: the cache keeps T - 3 positions, row 1's first dropped position
    stays as a filler with mask 0, and decoding still matches the reference that hides all dropped positions."""
    model, ref = models
    ids, mask, keep = batch
    ragged = keep.clone()
    ragged[1, 0] = False  # row 0 drops 3, row 1 drops 4
    removal = Removal.plan(ragged)
    assert removal.width == ids.shape[1] - 3
    assert removal.valid.sum(-1).tolist() == [ids.shape[1] - 3, ids.shape[1] - 4]
    assert removal.index[1].tolist() == sorted(removal.index[1].tolist())  # original order kept
    assert prune_mask(mask, removal)[1].tolist() == [0] + [1] * (ids.shape[1] - 4)
    tokens, step_logits = _decode(model, ids, mask, ragged)
    expected = _reference(ref, ids, mask, ragged, tokens)[:, ids.shape[1] :]
    assert (step_logits - expected).abs().max().item() < 1e-4


def test_plan_for_another_length_raises(models, batch):
    model, _ = models
    ids, mask, keep = batch
    _, cache = _prefill(model, ids, mask)
    with pytest.raises(ValueError, match=r"caches \[B=2, T=12\] but the removal plan is for \[B=2, T=11\]"):
        drop_cache_positions(cache, Removal.plan(keep[:, 1:]))
    assert cache.layers[0].keys.shape[2] == 12  # untouched
