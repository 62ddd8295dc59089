"""FastV peer (METHOD.md section 6): the last token's attention row, pruning inside one HF forward, the reduced cache
and decoding, each against an independent eager reference on tiny random Llama / Qwen2 backbones (fp32, CPU)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, DynamicCache

from skipvision.inference.kv import kv_cache_bytes, prune_mask
from skipvision.model import positions_from_mask
from skipvision.registry import SKIP_POLICIES
from skipvision.skip.fastv import fastv_prefill, last_token_attention
from skipvision.skip.ffn import decoder_layers
from skipvision.skip.visual import SkipVisionTokens

from .conftest import tiny_lm_config

LAYERS = 3  # so that K = 1 and K = 2 both leave layers after the pruning
RATIO = 0.5
NEXT_TOKEN = 5


def tiny_lm(model_type: str, attn: str) -> nn.Module:
    torch.manual_seed(0)
    cfg = tiny_lm_config(model_type, num_hidden_layers=LAYERS)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def models() -> dict[tuple[str, str], nn.Module]:
    """(model_type, attention implementation) -> model; both implementations of a type share the weights."""
    return {(kind, attn): tiny_lm(kind, attn) for kind in ("llama", "qwen2") for attn in ("sdpa", "eager")}


def make_batch(kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Embeddings [2, 16, 64], left-padded mask [2, 16] and image slots [2, 16] of two prompts ending in text.

    ``text_only``: row 0 (3 pads) has 8 image slots, row 1 none, so row 1 drops nothing and the cache keeps T
    positions, row 0's dropped ones as masked fillers. ``two_images``: 6 and 9 slots (two images in row 1), so both
    rows drop and the cache really shrinks."""
    embeds = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 16, dtype=torch.long)
    slots = torch.zeros(2, 16, dtype=torch.bool)
    if kind == "text_only":
        mask[0, :3] = 0
        slots[0, 5:13] = True
    else:
        mask[0, :2] = 0
        slots[0, 4:10] = True
        slots[1, [2, 3, 4, 5, 8, 9, 10, 11, 12]] = True
    return embeds, mask, slots


def eager_attention_row(model: nn.Module, embeds: torch.Tensor, mask: torch.Tensor, layer: int) -> torch.Tensor:
    """[B, T]: the last query's row of layer ``layer``'s eager attention weights (output_attentions), head mean."""
    with torch.no_grad():
        out = model(
            inputs_embeds=embeds, attention_mask=mask, position_ids=positions_from_mask(mask), output_attentions=True
        )
    return out.attentions[layer][:, :, -1].mean(1)  # [B, T]


def reference_dropped(row_scores: torch.Tensor, slots: torch.Tensor, ratio: float) -> list[int]:
    """The floor(ratio * n) image positions with the lowest scores, by a plain sort of one row (sorted)."""
    spots = slots.nonzero().flatten().tolist()
    worst = sorted(spots, key=lambda t: row_scores[t].item())[: math.floor(ratio * len(spots))]
    return sorted(worst)


def reference_logits(
    model: nn.Module,
    embeds: torch.Tensor,
    positions: torch.Tensor,
    keep: torch.Tensor,
    layer: int,
    prompt_len: int,
) -> torch.Tensor:
    """One unpadded row through the decoder layers by hand (eager model, no cache): layers < ``layer`` see every
    token, causally, except that tokens after the prompt never see the dropped prompt tokens (they are gone from
    the cache); layers >= ``layer`` run on the kept tokens only. embeds [n, D], positions [n], keep [n] bool ->
    logits [n_kept, V]."""
    inner = model.model
    hidden, pos = embeds[None], positions[None]  # [1, n, D], [1, n]
    n = hidden.shape[1]
    allowed = torch.ones(n, n, dtype=torch.bool).tril()  # [n(q), n(k)]
    allowed[prompt_len:] &= keep
    with torch.no_grad():
        for i, decoder_layer in enumerate(inner.layers):
            if i == layer:
                hidden, pos, allowed = hidden[:, keep], pos[:, keep], allowed[keep][:, keep]
            additive = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
            hidden = decoder_layer(
                hidden,
                attention_mask=additive[None, None],  # [1, 1, n, n]
                position_embeddings=inner.rotary_emb(hidden, pos),
                position_ids=pos,
            )
        return model.lm_head(inner.norm(hidden))[0]


def prefill(model: nn.Module, embeds, mask, slots, layer: int, ratio: float = RATIO):
    cache = DynamicCache(config=model.config)
    out = fastv_prefill(model, embeds, mask, positions_from_mask(mask), slots, cache, layer, ratio)
    return out, cache


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
@pytest.mark.parametrize("layer", [1, 2])
def test_attention_row_equals_eager_attention_weights(models, model_type: str, layer: int) -> None:
    model = models[model_type, "eager"]
    embeds, mask, _ = make_batch("text_only")
    seen = {}

    def capture(_module, args, kwargs) -> None:
        seen["hidden"], seen["rope"] = args[0], kwargs["position_embeddings"]

    handle = decoder_layers(model)[layer - 1].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        expected = eager_attention_row(model, embeds, mask, layer - 1)
    finally:
        handle.remove()
    with torch.no_grad():
        row = last_token_attention(decoder_layers(model)[layer - 1], seen["hidden"], seen["rope"], mask)
    assert row.shape == (2, 16)
    assert (row - expected).abs().max().item() < 1e-5
    assert row[0, :3].eq(0).all()  # padding gets no attention
    torch.testing.assert_close(row.sum(-1), torch.ones(2))


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
@pytest.mark.parametrize("layer", [1, 2])
@pytest.mark.parametrize("kind", ["text_only", "two_images"])
def test_prefill_and_decode_equal_a_reference_without_the_dropped_tokens(
    models, model_type: str, layer: int, kind: str
) -> None:
    model, ref = models[model_type, "sdpa"], models[model_type, "eager"]
    embeds, mask, slots = make_batch(kind)
    scores = eager_attention_row(ref, embeds, mask, layer - 1)  # [B, T]
    out, cache = prefill(model, embeds, mask, slots, layer)
    positions = positions_from_mask(mask)  # [B, T]
    batch, length = mask.shape

    # The survivors are the reference's choice: every position but the lowest-attended image share.
    dropped = [reference_dropped(scores[b], slots[b], RATIO) for b in range(batch)]
    for b in range(batch):
        survivors = out.removal.index[b][out.removal.valid[b]].tolist()
        assert survivors == [t for t in range(length) if t not in dropped[b]]

    # Every layer caches the same T - min(drops) positions; layers < K held all T right after the forward.
    width = length - min(len(d) for d in dropped)
    unit = kv_cache_bytes(cache) // (LAYERS * width)  # bytes of one position in one layer
    for cache_layer in cache.layers:
        assert cache_layer.keys.shape == (batch, 2, width, 16) and cache_layer.values.shape == (batch, 2, width, 16)
    assert out.kv_bytes_before == unit * (layer * length + (LAYERS - layer) * width)

    # One decode step over the reduced cache: pruned mask + explicit true positions.
    token_embed = model.get_input_embeddings()(torch.full((batch, 1), NEXT_TOKEN))  # [B, 1, D]
    step_mask = torch.cat([prune_mask(mask, out.removal), torch.ones(batch, 1, dtype=torch.long)], dim=1)
    next_pos = positions[:, -1:] + 1  # [B, 1]
    with torch.no_grad():
        step = model(
            inputs_embeds=token_embed, attention_mask=step_mask, position_ids=next_pos, cache=cache, use_cache=True
        ).logits[:, -1]  # [B, V]

    for b in range(batch):
        real = mask[b].bool()
        keep = torch.tensor([t not in dropped[b] for t in range(length)])[real]  # [n]
        row_embeds, row_pos = embeds[b, real], positions[b, real]  # [n, D], [n]
        want = reference_logits(ref, row_embeds, row_pos, keep, layer, len(row_pos))[-1]
        assert (out.logits[b] - want).abs().max().item() < 1e-4
        extended = reference_logits(
            ref,
            torch.cat([row_embeds, token_embed[b]]),
            torch.cat([row_pos, next_pos[b]]),
            torch.cat([keep, torch.ones(1, dtype=torch.bool)]),
            layer,
            len(row_pos),
        )
        assert (step[b] - extended[-1]).abs().max().item() < 1e-4
        if dropped[b]:  # non-vacuous: the pruning changes this row's logits
            unpruned = reference_logits(ref, row_embeds, row_pos, torch.ones_like(keep), layer, len(row_pos))[-1]
            assert (out.logits[b] - unpruned).abs().max().item() > 1e-3


@pytest.mark.parametrize("kind", ["text_only", "two_images"])
def test_sdpa_and_eager_agree(models, kind: str) -> None:
    embeds, mask, slots = make_batch(kind)
    sdpa, sdpa_cache = prefill(models["llama", "sdpa"], embeds, mask, slots, 1)
    eager, eager_cache = prefill(models["llama", "eager"], embeds, mask, slots, 1)
    assert torch.equal(sdpa.removal.index, eager.removal.index)
    assert torch.equal(sdpa.removal.valid, eager.removal.valid)
    assert (sdpa.logits - eager.logits).abs().max().item() < 1e-5
    assert sdpa.kv_bytes_before == eager.kv_bytes_before
    real = mask.gather(1, sdpa.removal.index).bool()  # [B, K]: not padding, whose fully masked queries differ
    for a, b in zip(sdpa_cache.layers, eager_cache.layers, strict=True):
        torch.testing.assert_close(a.keys.transpose(1, 2)[real], b.keys.transpose(1, 2)[real], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.values.transpose(1, 2)[real], b.values.transpose(1, 2)[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.7, 0.99])
def test_each_row_drops_floor_ratio_times_its_image_slots(models, ratio: float) -> None:
    embeds, mask, slots = make_batch("two_images")
    text_embeds, text_mask, text_slots = make_batch("text_only")
    for e, m, s in ((embeds, mask, slots), (text_embeds, text_mask, text_slots)):
        out, _ = prefill(models["llama", "sdpa"], e, m, s, 2, ratio)
        dropped = [sorted(set(range(16)) - set(out.removal.index[b][out.removal.valid[b]].tolist())) for b in (0, 1)]
        counts = [int(s[b].sum()) for b in (0, 1)]
        assert [len(d) for d in dropped] == [math.floor(ratio * n) for n in counts]
        assert all(bool(s[b, d].all()) for b, d in enumerate(dropped))  # only image slots are dropped


def test_hooks_are_removed_afterwards_even_on_error(models) -> None:
    model = models["llama", "sdpa"]
    embeds, mask, slots = make_batch("two_images")
    plain_args = {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": positions_from_mask(mask)}
    with torch.no_grad():
        before = model(**plain_args).logits
    prefill(model, embeds, mask, slots, 1)
    with pytest.raises(RuntimeError):  # the hidden size is wrong: fails inside the hooked forward
        prefill(model, torch.randn(2, 16, 65), mask, slots, 1)
    assert all(not layer._forward_pre_hooks for layer in decoder_layers(model))
    with torch.no_grad():
        assert torch.equal(model(**plain_args).logits, before)


def test_invalid_arguments_raise_naming_the_valid_range(models) -> None:
    model = models["llama", "sdpa"]
    embeds, mask, slots = make_batch("two_images")
    with pytest.raises(ValueError, match=r"layer \(K\) must be in \[1, 2\] for this 3-layer backbone, got 3"):
        prefill(model, embeds, mask, slots, 3)
    with pytest.raises(ValueError, match=r"must be >= 1, got 0"):
        prefill(model, embeds, mask, slots, 0)
    for ratio in (0.0, 1.0, -0.5):
        with pytest.raises(ValueError, match=r"ratio \(share of image tokens dropped\) must be in \(0, 1\)"):
            prefill(model, embeds, mask, slots, 1, ratio)
    with pytest.raises(ValueError, match=r"must be in \(0, 1\), got 1.5"):
        SKIP_POLICIES.build({"name": "fastv", "layer": 2, "ratio": 1.5})
    ends_in_image = slots.clone()
    ends_in_image[:, -1] = True
    with pytest.raises(ValueError, match="last prompt position is an image slot"):
        prefill(model, embeds, mask, ends_in_image, 1)
    with pytest.raises(ValueError, match="prompts must be left-padded"):
        prefill(model, embeds, mask.flip(1), slots.flip(1), 1)
    mistral = AutoModelForCausalLM.from_config(tiny_lm_config("mistral", num_hidden_layers=LAYERS)).eval()
    with pytest.raises(NotImplementedError, match="only full-attention decoders"):
        prefill(mistral, embeds, mask, slots, 1)


def test_policy_keeps_every_token_at_the_token_stage() -> None:
    policy = SKIP_POLICIES.build(SKIP_POLICIES.tiny_spec("fastv"))
    assert (policy.skips, policy.prunes_in_llm, policy.merge_to, policy.layer, policy.ratio) == (
        False,
        True,
        None,
        1,
        0.5,
    )
    visual = SkipVisionTokens(num_tokens=6, dim=8, policy={"name": "fastv", "layer": 2, "ratio": 0.5})
    feats = torch.randn(3, 6, 8)
    tokens = visual(feats, None)
    assert visual.num_slots == 6 and tokens.tokens is feats and bool(tokens.ffn.all())
