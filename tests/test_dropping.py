"""The multi-stage in-LLM token dropper (skipvision/skip/dropping.py) on a tiny random Llama (fp32, SDPA, CPU)
against a reference written by hand: each row alone (so no fillers), the decoder layers looped over one by one, the
query's attention row computed from the q/k projections at each boundary, the survivors' hidden states, RoPE and a
4-D causal + padding mask gathered by hand. Two stages; rows drop different counts, so the batch needs fillers."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, DynamicCache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from skipvision.inference.generate import Decoder
from skipvision.inference.kv import prune_mask
from skipvision.model import next_token_loss, positions_from_mask
from skipvision.skip.dropping import Stage, dropping, lowest_scored, trim_cache

from .conftest import tiny_lm_config

STAGES = ((1, 0.5), (3, 0.5))  # (K, ratio): layer 0 scores the first drop, layer 2 the second
T, QUERY = 16, 12  # the training rows' scoring token: the last instruction token, followed by the answer


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    cfg = tiny_lm_config("llama", num_hidden_layers=4)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.float32)


def stages() -> list[Stage]:
    return [Stage(k, partial(lowest_scored, ratio=r)) for k, r in STAGES]


def make_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Embeddings [2, 16, 64], left-padded mask, image slots and labels: row 0 has 3 pads and 8 slots (drops 4, then
    2), row 1 6 slots (drops 3, then 1); positions 12..15 are text, 13..15 labelled (the answer)."""
    embeds = torch.randn(2, T, 64, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, T, dtype=torch.long)
    mask[0, :3] = 0
    slots = torch.zeros(2, T, dtype=torch.bool)
    slots[0, 4:12] = True
    slots[1, 2:8] = True
    labels = torch.full((2, T), -100)
    labels[:, 13:] = torch.tensor([[3, 4, 5], [6, 7, 8]])
    return embeds, mask, slots, labels


def reference_row(
    model: nn.Module,
    embeds: torch.Tensor,
    valid: torch.Tensor,
    slots: torch.Tensor,
    query: int,
    drops: list[list[int]] | None = None,
    extra: int = 0,
    no_ffn: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[int], list[list[int]], list[tuple[list[int], torch.Tensor]]]:
    """One row alone: ``embeds`` [n, D], ``valid``/``slots`` [n]. At each boundary the ``query`` position's attention
    row (eager math) ranks the remaining slots and the lowest ``floor(ratio * slots)`` leave the sequence (or
    ``drops``, given per stage). The last ``extra`` positions (decoded tokens) never see a dropped position, in any
    layer, as after cache trimming; positions ``no_ffn`` [n] bool (Skip-FFN's S slots) get a zero MLP output in every
    layer. Returns the final hidden states [n', D], the surviving positions, the drops per
    stage and per layer (positions present, their keys [H_kv, n_i, hd])."""
    base = model.model
    positions = positions_from_mask(valid[None])[0]  # [n]
    gone = {t for stage in drops for t in stage} if drops else set()
    kept, made, keys = list(range(embeds.shape[0])), [], []
    h = embeds[None]  # [1, n_i, D]
    for i, layer in enumerate(base.layers):
        idx = torch.tensor(kept)
        n = len(kept)
        cos, sin = base.rotary_emb(h, positions[idx][None])  # [1, n_i, hd] each
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        q = attn.q_proj(x).view(1, n, -1, attn.head_dim).transpose(1, 2)  # [1, H, n_i, hd]
        k = attn.k_proj(x).view(1, n, -1, attn.head_dim).transpose(1, 2)  # [1, H_kv, n_i, hd]
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        keys.append((kept, k[0]))
        see = torch.ones(n, n).tril().bool() & valid[idx].bool()[None, :]  # [n_i, n_i] causal + padding
        see[idx >= embeds.shape[0] - extra] &= ~torch.isin(idx, torch.tensor(sorted(gone) or [-1]))[None, :]
        see |= torch.eye(n, dtype=torch.bool)  # padding queries see themselves (never fully masked)
        additive = torch.zeros(n, n).masked_fill(~see, torch.finfo(torch.float32).min)[None, None]  # [1, 1, n, n]
        stage = next((j for j, (k_layer, _) in enumerate(STAGES) if k_layer == i + 1), None)
        if stage is not None:
            if drops is None:
                group = attn.num_key_value_groups
                scores = q[0] @ k[0].repeat_interleave(group, 0).transpose(-1, -2) * attn.scaling  # [H, n_i, n_i]
                qi = kept.index(query)
                row = scores[:, qi].masked_fill(~see[qi], float("-inf")).softmax(-1).mean(0)  # [n_i]
                candidates = [j for j, t in enumerate(kept) if slots[t]]
                worst = sorted(candidates, key=lambda j: row[j].item())[
                    : math.floor(STAGES[stage][1] * len(candidates))
                ]
                made.append(sorted(kept[j] for j in worst))
            else:
                made.append(drops[stage])
        handle = None
        if no_ffn is not None:
            gate = (~no_ffn[idx]).to(h.dtype)[None, :, None]  # [1, n_i, 1]
            handle = layer.mlp.register_forward_hook(lambda _m, _a, out, gate=gate: out * gate)
        h = layer(h, attention_mask=additive, position_embeddings=(cos, sin), position_ids=positions[idx][None])
        if handle is not None:
            handle.remove()
        if stage is not None:
            survive = [j for j, t in enumerate(kept) if t not in made[stage]]
            h = h[:, survive]  # [1, n_{i+1}, D]
            kept = [kept[j] for j in survive]
    return base.norm(h)[0], kept, made, keys


def test_two_stages_in_training_equal_the_reference_in_logits_and_gradients(model) -> None:
    model.train()
    embeds, mask, slots, labels = make_batch()
    params = [p for name, p in model.named_parameters() if "embed_tokens" not in name]  # inputs_embeds are given
    leaf = embeds.clone().requires_grad_(True)
    query = torch.full((2,), QUERY)
    with dropping(model, stages(), mask, positions_from_mask(mask), slots, labels, query) as dropper:
        logits = model(inputs_embeds=leaf, attention_mask=mask, position_ids=positions_from_mask(mask)).logits
    loss = next_token_loss(logits, labels)
    grads = torch.autograd.grad(loss, [leaf, *params])

    ref_leaf = embeds.clone().requires_grad_(True)
    ref_logits = torch.zeros(2, T, logits.shape[-1])
    for b in range(2):
        hidden, kept, made, _ = reference_row(model, ref_leaf[b], mask[b], slots[b], QUERY)
        assert [len(d) for d in made] == [[4, 2], [3, 1]][b]
        survivors = dropper.removal.index[b][dropper.removal.valid[b]].tolist()
        assert survivors == kept
        ref_logits = ref_logits.index_put((torch.tensor(b), torch.tensor(kept)), model.lm_head(hidden))
        real = [t for t in kept if mask[b, t]]
        assert (logits[b, real] - ref_logits[b, real]).abs().max().item() < 1e-5
    assert not bool(dropper.removal.valid.all())  # rows drop 6 and 4: row 1 keeps 2 fillers
    ref_grads = torch.autograd.grad(next_token_loss(ref_logits, labels), [ref_leaf, *params])
    assert (loss - next_token_loss(ref_logits, labels)).abs().item() < 1e-5
    for got, want in zip(grads, ref_grads, strict=True):
        assert torch.isfinite(got).all()
        assert (got - want).abs().max().item() < 1e-5
    model.eval()


def test_dropping_a_labelled_prediction_raises(model) -> None:
    embeds, mask, slots, labels = make_batch()
    labels[:, 5:] = 1  # image slots followed by labels: misuse
    with pytest.raises(ValueError, match="is dropped but the next label is 1"):
        with dropping(model, stages(), mask, positions_from_mask(mask), slots, labels, torch.full((2,), QUERY)):
            model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions_from_mask(mask))
    assert all(not layer._forward_pre_hooks and not layer._forward_hooks for layer in model.model.layers)


def test_invalid_stages_raise(model) -> None:
    _, mask, slots, _ = make_batch()
    positions = positions_from_mask(mask)
    rule = partial(lowest_scored, ratio=0.5)
    for bad in ([Stage(3, rule), Stage(1, rule)], [Stage(2, rule), Stage(2, rule)], []):
        with pytest.raises(ValueError, match="strictly increasing and non-empty"):
            with dropping(model, bad, mask, positions, slots):
                pass
    with pytest.raises(ValueError, match=r"layer \(K\) must be in \[1, 3\] for this 4-layer backbone, got 4"):
        with dropping(model, [Stage(4, rule)], mask, positions, slots):
            pass
    with pytest.raises(ValueError, match="a query position is an image slot"):
        with dropping(model, stages(), mask, positions, slots, query_index=torch.tensor([4, 2])):
            pass


def test_two_stage_prefill_caches_the_final_survivors_and_decodes_like_the_reference(model) -> None:
    embeds, mask, slots, _ = make_batch()  # prompts: the last position (text) scores
    positions = positions_from_mask(mask)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        with dropping(model, stages(), mask, positions, slots) as dropper:
            out = model(
                inputs_embeds=embeds,
                attention_mask=mask,
                position_ids=positions,
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        trim_cache(cache, dropper)
        removal = dropper.removal
        made = []
        for b in range(2):
            hidden, kept, drops, keys = reference_row(model, embeds[b], mask[b], slots[b], T - 1)
            made.append(drops)
            assert removal.index[b][removal.valid[b]].tolist() == kept
            assert (out.logits[b, -1] - model.lm_head(hidden[-1])).abs().max().item() < 1e-5
            real = removal.valid[b] & mask[b, removal.index[b]].bool()  # [K]: not padding, whose keys differ
            for layer, (present, k) in zip(cache.layers, keys, strict=True):
                assert layer.keys.shape[2] == removal.width  # every layer holds the same columns
                columns = [present.index(t) for t in kept if mask[b, t]]
                assert (layer.keys[b][:, real] - k[:, columns]).abs().max().item() < 1e-5

        token = torch.tensor([5, 9])
        key_positions = positions.gather(1, removal.index)  # [B, K]
        step = Decoder(model, cache, prune_mask(mask, removal), key_positions, positions[:, -1:] + 1)(token)  # [B, V]
        for b in range(2):
            full = torch.cat([embeds[b], model.get_input_embeddings()(token[b])[None]])  # [T + 1, D]
            valid = torch.cat([mask[b], torch.ones(1, dtype=torch.long)])  # [T + 1]
            after = reference_row(
                model, full, valid, torch.cat([slots[b], torch.zeros(1, dtype=torch.bool)]), T - 1, made[b], 1
            )[0]
            assert (step[b] - model.lm_head(after[-1])).abs().max().item() < 1e-5
