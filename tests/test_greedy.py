"""Cached, batched greedy decoding equals step-by-step full forwards without a cache, with left padding."""

from __future__ import annotations

from pathlib import Path

import torch

from skipvision.data.chat import encode_prompt
from skipvision.data.collate import pad_sequences
from skipvision.data.tokenizer import load_tokenizer
from skipvision.inference.greedy import greedy_generate

from .test_model import build


def _reference(model, ids: list[int], pixels: torch.Tensor | None, steps: int, eos: int) -> list[int]:
    """One sample, no padding, no cache: re-run the whole sequence for every new token."""
    out: list[int] = []
    n_img = torch.tensor([0 if pixels is None else pixels.shape[0]])
    for _ in range(steps):
        seq = torch.tensor([ids + out])
        logits = model(seq, torch.ones_like(seq), pixels, n_img).logits
        token = int(logits[0, -1].argmax())
        if token == eos:
            break
        out.append(token)
    return out


def test_batched_cached_greedy_equals_uncached_one_by_one(tiny_shapes: Path) -> None:
    tok = load_tokenizer(tiny_shapes / "tokenizer")
    model = build(tok)
    with torch.no_grad():  # EOS logit 0, the others spread wide: EOS never wins, every step is exercised
        model.backbone.lm_head.weight.mul_(100.0)
        model.backbone.lm_head.weight[tok.eos_token_id] = 0.0
    n = model.num_image_tokens
    prompts = [
        encode_prompt(tok, "What colour is the circle?", n, 1, model.image_token_id),
        encode_prompt(tok, "Is there a red square in this picture or not, tell me?", n, 1, model.image_token_id),
        encode_prompt(tok, "Hello", n, 0, model.image_token_id),
    ]
    torch.manual_seed(3)
    pixels = torch.randn(2, 3, 32, 32)
    ids = pad_sequences(prompts, tok.pad_token_id, left=True)
    mask = pad_sequences([[1] * len(p) for p in prompts], 0, left=True)
    with torch.no_grad():
        got = greedy_generate(model, ids, mask, pixels, torch.tensor([1, 1, 0]), 5, tok.eos_token_id)
        want = [
            _reference(model, prompts[0], pixels[:1], 5, tok.eos_token_id),
            _reference(model, prompts[1], pixels[1:], 5, tok.eos_token_id),
            _reference(model, prompts[2], None, 5, tok.eos_token_id),
        ]
    assert [len(g) for g in got] == [5, 5, 5]
    assert got == want
