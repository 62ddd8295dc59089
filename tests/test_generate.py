"""The generation loop (docs/method.md "KV removal"): plain HF parity without removal, the masked no-cache reference
with removal, batching, exact cache shrinkage, sampling, stopping, and errors."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import DynamicCache

from skipvision.data.chat import encode_prompt
from skipvision.data.collate import pad_sequences
from skipvision.data.tokenizer import load_tokenizer
from skipvision.inference import GenerationConfig, PromptTooLongError, Request, RequestError, VLMGenerator
from skipvision.inference.generate import generate_tokens, prefill
from skipvision.model import positions_from_mask

from .test_model import build as build_full
from .test_skip_model import N_S
from .test_skip_model import build as build_skip

STEPS = 5


@pytest.fixture(scope="module")
def tok(tiny_shapes: Path):
    return load_tokenizer(tiny_shapes / "tokenizer")


def _never_eos(model, tok):
    """Spread the logits wide and pin EOS at 0: EOS never wins, so every step is exercised."""
    with torch.no_grad():
        model.backbone.lm_head.weight.mul_(100.0)
        model.backbone.lm_head.weight[tok.eos_token_id] = 0.0
    return model


@pytest.fixture(scope="module")
def skip_model(tok):
    return _never_eos(build_skip(tok), tok)


@pytest.fixture(scope="module")
def full_model(tok):
    return _never_eos(build_full(tok), tok)


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]


def _batch(model, tok):
    """Three left-padded prompts: two with different images and lengths, one text-only."""
    n, image_id = model.num_image_tokens, model.image_token_id
    prompts = [
        encode_prompt(tok, "What colour is the circle?", n, 1, image_id),
        encode_prompt(tok, "Is there a red square in this picture or not, tell me?", n, 1, image_id),
        encode_prompt(tok, "Hello there", n, 0, image_id),
    ]
    ids = pad_sequences(prompts, tok.pad_token_id, left=True)  # [3, P]
    mask = pad_sequences([[1] * len(p) for p in prompts], 0, left=True)  # [3, P]
    torch.manual_seed(3)
    return ids, mask, torch.randn(2, 3, 32, 32), torch.tensor([1, 1, 0])


def _hf_greedy(model, ids, mask, pixels, num_images, steps: int) -> list[list[int]]:
    """HF ``generate()`` on the same input embeddings; the prefill gets the Skip-FFN plan (decode steps [B, 1] never
    match a [B, P] plan, so they run the plain MLP)."""
    with torch.no_grad():
        embedded = model.embed(ids, pixels, num_images)
        if model.skip_ffn is not None:
            model.skip_ffn.set_plan(embedded.ffn_mask)
        out = model.backbone.generate(
            inputs_embeds=embedded.embeds, attention_mask=mask, max_new_tokens=steps, do_sample=False
        )
        if model.skip_ffn is not None:
            model.skip_ffn.set_plan(None)
    return out.tolist()


@pytest.mark.parametrize("which", ["full", "skip"])
def test_without_removal_equals_plain_hf_cached_greedy(which, full_model, skip_model, tok) -> None:
    model = full_model if which == "full" else skip_model
    ids, mask, pixels, num_images = _batch(model, tok)
    config = GenerationConfig(max_new_tokens=STEPS, drop_kv=False)
    got = generate_tokens(model, ids, mask, pixels, num_images, config, tok.eos_token_id, tok)
    assert [g.token_ids for g in got] == _hf_greedy(model, ids, mask, pixels, num_images, STEPS)
    assert all(g.stats.finish_reason == "length" and g.stats.generated_tokens == STEPS for g in got)


def _masked_reference(model, ids, mask, pixels, num_images, tokens: torch.Tensor, hide_skipped: bool):
    """No cache, eager: prompt + generated tokens in one forward with the prefill's Skip-FFN plan and a 4-D additive
    mask: causal + padding; the generated tokens' queries also do not see the skipped slots. -> logits [B, L, V]"""
    embedded = model.embed(ids, pixels, num_images)
    batch, prompt_len = ids.shape
    embeds = torch.cat([embedded.embeds, model.backbone.get_input_embeddings()(tokens)], 1)  # [B, L, D]
    full_mask = torch.cat([mask, torch.ones_like(tokens)], 1)  # [B, L]
    length = full_mask.shape[1]
    allowed = torch.ones(length, length, dtype=torch.bool).tril()[None] & full_mask.bool()[:, None, :]  # [B, L, L]
    skipped = torch.cat([~embedded.ffn_mask, torch.zeros_like(tokens, dtype=torch.bool)], 1)  # [B, L]
    if hide_skipped:
        allowed[:, prompt_len:, :] &= ~skipped[:, None, :]
    additive = torch.zeros(batch, 1, length, length).masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)
    model.skip_ffn.set_plan(~skipped)
    try:
        out = model.backbone(inputs_embeds=embeds, attention_mask=additive, position_ids=positions_from_mask(full_mask))
    finally:
        model.skip_ffn.set_plan(None)
    return out.logits


def test_with_removal_logits_equal_masked_no_cache_reference(skip_model, tok) -> None:
    ids, mask, pixels, num_images = _batch(skip_model, tok)
    config = GenerationConfig(max_new_tokens=STEPS, output_logits=True)
    got = generate_tokens(skip_model, ids, mask, pixels, num_images, config, tok.eos_token_id, tok)
    tokens = torch.tensor([g.token_ids[:-1] for g in got])  # [B, STEPS - 1]: fed back to make the last logits
    ref_model = copy.deepcopy(skip_model)
    ref_model.backbone.set_attn_implementation("eager")
    with torch.no_grad():
        want = _masked_reference(ref_model, ids, mask, pixels, num_images, tokens, hide_skipped=True)
        unhidden = _masked_reference(ref_model, ids, mask, pixels, num_images, tokens, hide_skipped=False)
    logits = torch.stack([g.logits for g in got])  # [B, STEPS, V]
    prompt_len = ids.shape[1]
    steps = slice(prompt_len - 1, prompt_len - 1 + STEPS)
    assert (logits - want[:, steps]).abs().max().item() < 1e-4
    # Non-vacuous: the image rows' decode steps differ when the skipped slots stay visible.
    assert (logits[:2, 1:] - unhidden[:2, steps][:, 1:]).abs().max().item() > 1e-3


def test_batched_equals_one_by_one(skip_model, tok) -> None:
    gen = VLMGenerator(skip_model, tok)
    a, b, c = _images(3)
    requests = [
        Request("What colour is the circle?", a),
        Request("Hello there", None),
        Request("<image>\nIs there a red square in this picture or not, tell me?", b),
        Request("How many shapes?", c),
    ]
    config = GenerationConfig(max_new_tokens=STEPS, output_logits=True)
    together = gen.generate(requests, config, batch_size=4)
    alone = [gen.generate([r], config)[0] for r in requests]
    assert [g.token_ids for g in together] == [g.token_ids for g in alone]
    assert [g.text for g in together] == [g.text for g in alone]
    for x, y in zip(together, alone, strict=True):
        torch.testing.assert_close(x.logits, y.logits, rtol=1e-4, atol=1e-4)


def test_cache_shrinks_by_exactly_n_s_positions_per_layer_per_sample(skip_model, tok) -> None:
    ids, mask, pixels, _ = _batch(skip_model, tok)
    ids, mask = ids[:2], mask[:2]  # the two image prompts, different lengths
    prompt_len = ids.shape[1]
    for drop in (False, True):
        cache = DynamicCache(config=skip_model.backbone.config)
        pre = prefill(skip_model, ids, mask, pixels, torch.tensor([1, 1]), cache, drop_kv=drop)
        want = prompt_len - N_S if drop else prompt_len
        for layer in cache.layers:
            assert layer.keys.shape[:3] == (2, skip_model.backbone.config.num_key_value_heads, want)
            assert layer.values.shape[2] == want
        assert pre.mask.shape == (2, want)
        assert pre.kept.tolist() == (mask.sum(-1) - (N_S if drop else 0)).tolist()
    gens = VLMGenerator(skip_model, tok).generate([Request("hi", img) for img in _images(2)], GenerationConfig(1))
    for g in gens:  # per request: the exact kept share of its real positions
        s = g.stats
        assert s.kv_bytes_kept * s.prompt_tokens == s.kv_bytes_prefill * (s.prompt_tokens - N_S)


def test_text_only_rows_keep_their_cache(skip_model, tok) -> None:
    [g] = VLMGenerator(skip_model, tok).generate([Request("Hello there")], GenerationConfig(2))
    assert g.stats.kv_bytes_kept == g.stats.kv_bytes_prefill > 0


def test_sampling_is_seeded_and_top_k_1_is_greedy(tok) -> None:
    model = build_skip(tok)  # unscaled logits: a flat distribution, so samples differ between seeds
    gen = VLMGenerator(model, tok)
    requests = [Request("What colour is the circle?", img) for img in _images(2)]

    def run(**kw) -> list[list[int]]:
        return [g.token_ids for g in gen.generate(requests, GenerationConfig(max_new_tokens=8, **kw))]

    assert run(temperature=1.5, seed=7) == run(temperature=1.5, seed=7)
    assert run(temperature=1.5, seed=7) != run(temperature=1.5, seed=8)
    greedy = run()
    assert run(temperature=1.5, top_k=1, seed=1) == greedy
    assert run(temperature=0.7, top_p=1e-9, seed=2) == greedy


def test_stop_strings_eos_and_length_end_rows(skip_model, tok) -> None:
    gen = VLMGenerator(skip_model, tok)
    request = Request("What colour is the circle?", _images(1)[0])
    [plain] = gen.generate([request], GenerationConfig(max_new_tokens=6))
    assert plain.stats.finish_reason == "length" and len(plain.token_ids) == 6
    stop = tok.decode(plain.token_ids[2:4], skip_special_tokens=True)
    cut = plain.text.find(stop)
    assert stop and cut >= 0
    [stopped] = gen.generate([request], GenerationConfig(max_new_tokens=6, stop=(stop,)))
    assert stopped.stats.finish_reason == "stop" and stopped.text == plain.text[:cut]

    calls = []

    def eos_from_third_forward(module, args, logits):  # the prefill and one decode step produce normal tokens
        calls.append(1)
        return logits.index_fill(-1, torch.tensor([tok.eos_token_id]), 1e4) if len(calls) >= 3 else logits

    handle = skip_model.backbone.lm_head.register_forward_hook(eos_from_third_forward)
    try:
        [ended] = gen.generate([request], GenerationConfig(max_new_tokens=6))
    finally:
        handle.remove()
    assert ended.stats.finish_reason == "eos" and ended.token_ids == plain.token_ids[:2]
    assert ended.stats.generated_tokens == 2 and ended.text == tok.decode(plain.token_ids[:2]).removeprefix(" ")


def test_context_limit_ends_generation_and_rejects_long_prompts(skip_model, tok) -> None:
    model = copy.deepcopy(skip_model)
    gen = VLMGenerator(model, tok)
    request = Request("What colour is the circle?", _images(1)[0])
    ids = torch.tensor([gen.encode([request])[0].ids])  # [1, P]
    prompt_len = ids.shape[1]
    model.backbone.config.max_position_embeddings = prompt_len + 2
    [g] = gen.generate([request], GenerationConfig(max_new_tokens=6))
    assert len(g.token_ids) == 2 and g.stats.finish_reason == "context"
    model.backbone.config.max_position_embeddings = prompt_len
    with pytest.raises(RequestError, match=rf"request 0 has {prompt_len} tokens .* context is {prompt_len} positions"):
        gen.generate([request])
    with pytest.raises(PromptTooLongError, match="prompt 0 has"):
        generate_tokens(model, ids, torch.ones_like(ids), None, None, GenerationConfig(), tok.eos_token_id)


def test_request_errors_name_the_request(skip_model, tok, tmp_path: Path) -> None:
    gen = VLMGenerator(skip_model, tok)
    img = _images(1)[0]
    with pytest.raises(RequestError, match=r"request 1: prompt has 2 <image> placeholder\(s\) but 1 image"):
        gen.generate([Request("hi", img), Request("<image> and <image>", img)])
    with pytest.raises(RequestError, match=r"request 0: prompt has 1 <image> placeholder\(s\) but 0 image"):
        gen.generate([Request("<image> what is this?")])
    with pytest.raises(RequestError, match="request 0: no image at"):
        gen.generate([Request("hi", tmp_path / "missing.png")])
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(RequestError, match="cannot read image .*broken.png"):
        gen.generate([Request("hi", broken)])


def test_config_errors() -> None:
    with pytest.raises(ValueError, match="set temperature > 0"):
        GenerationConfig(top_k=5)
    with pytest.raises(ValueError, match="top_p must be in"):
        GenerationConfig(temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        GenerationConfig(max_new_tokens=0)


def test_agree_keeps_stepping_until_every_rank_is_done(skip_model, tok) -> None:
    """docs/distributed.md "SPMD": with ``agree`` (validation on several ranks) a rank whose rows have all ended keeps
    running forwards until its peers' have too, so every rank joins the same collectives; its own results do not
    change. The peer here needs 4 steps, this rank's only row ends with an EOS at its first token."""
    ids, mask, pixels, num_images = _batch(skip_model, tok)
    ids, mask, pixels, num_images = ids[:1], mask[:1], pixels[:1], num_images[:1]
    config = GenerationConfig(max_new_tokens=STEPS)
    first = generate_tokens(skip_model, ids, mask, pixels, num_images, config, None)[0].token_ids[0]
    forwards = []
    hook = skip_model.backbone.register_forward_hook(lambda *_: forwards.append(1))
    try:
        alone = generate_tokens(skip_model, ids, mask, pixels, num_images, config, first, tok)
        assert len(forwards) == 1  # the prefill's token was the EOS: no decode step
        forwards.clear()
        answers = []

        def peer_needs_four_steps(done: bool) -> bool:
            answers.append(done)
            return done and len(answers) >= 4

        synced = generate_tokens(skip_model, ids, mask, pixels, num_images, config, first, tok, peer_needs_four_steps)
    finally:
        hook.remove()
    assert answers == [True] * 4 and len(forwards) == 4  # the prefill and 3 decode steps, like the peer
    assert synced[0].token_ids == alone[0].token_ids == [] and synced[0].stats.finish_reason == "eos"
