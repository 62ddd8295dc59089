"""The generation loop's pieces (skipvision/inference/stopping.py, stats.py): per-row endings kept on the device,
stop strings found by incremental decoding exactly where full re-decoding finds them, and a batch whose rows end at
different steps for different reasons giving each row's answer alone (docs/method.md "KV removal")."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from skipvision.data.tokenizer import load_tokenizer, train_tokenizer
from skipvision.inference import GenerationConfig, Request, VLMGenerator
from skipvision.inference.stats import StepClock, step_times
from skipvision.inference.stopping import Stopping, StopStrings, cut_at_stop, decode_text

from .test_generate import _images, _never_eos
from .test_skip_model import build as build_skip

EOS = 2
CORPUS = [
    "the café serves naïve crème brûlée to the über-cool crowd",
    "中文 文字 and 日本語 mixed with English words, emoji 🙂 🚀 too!",
    "What colour is the circle? It is red . Isn't it ? Yes , it's red .",
    "a big blue square next to a small green triangle and a yellow star",
] * 4


def run_stopping(streams: list[list[int]], room: list[int], stops: dict[int, int], max_new: int = 5):
    """Drives a :class:`Stopping` over hand-made token streams [B][steps]; ``stops`` row -> step of a stop string.
    Returns the step at which the loop would stop and the endings."""
    stopping = Stopping(room, max_new, EOS, torch.device("cpu"), stop_strings=bool(stops))
    steps = len(streams[0])
    for step in range(1, steps + 1):
        stopping.update(step, torch.tensor([s[step - 1] for s in streams]))
        stopping.stop([row for row, at in stops.items() if at == step], step)
        if stopping.done(step):
            return step, stopping.endings([s[:step] for s in streams])
    raise AssertionError("never done")


def test_rows_end_for_the_first_reason_in_the_order_eos_stop_budget() -> None:
    streams = [
        [7, 7, 7, 7, 7],  # runs to max_new_tokens
        [7, 7, 7, EOS, 7],  # its context ends it at step 3; the later EOS does not count
        [7, EOS, 7, 7, 7],  # EOS at step 2; a stop string found later does not count
        [7, 7, 7, 7, EOS],  # EOS on its last allowed step is still "eos"
        [7, 7, 7, 7, 7],  # a stop string at step 3
        [7, 7, EOS, 7, 7],  # EOS and a stop string at the same step: "eos"
    ]
    room = [5, 3, 5, 5, 5, 5]
    last, endings = run_stopping(streams, room, stops={2: 4, 4: 3, 5: 3})
    assert last == 5
    assert [(e.steps, e.reason) for e in endings] == [
        (5, "length"),
        (3, "context"),
        (2, "eos"),
        (5, "eos"),
        (3, "stop"),
        (3, "eos"),
    ]


def test_the_loop_stops_when_the_last_row_ends() -> None:
    streams = [[7, EOS, 7, 7, 7, 7], [7, 7, 7, EOS, 7, 7], [7, 7, 7, 7, 7, 7]]
    last, endings = run_stopping(streams, [6, 6, 6], stops={2: 3}, max_new=6)
    assert last == 4 and [(e.steps, e.reason) for e in endings] == [(2, "eos"), (4, "eos"), (3, "stop")]
    # Without EOS or stop strings the budgets alone decide, without looking at the tokens.
    stopping = Stopping([2, 4], 6, None, torch.device("cpu"))
    assert [stopping.done(step) for step in (1, 2, 3, 4)] == [False, False, False, True]


def _byte_level(tmp_path: Path) -> PreTrainedTokenizerFast:
    """The project's own kind (GPT-2 style): every byte is a symbol, so one character can span tokens."""
    return train_tokenizer(CORPUS, tmp_path / "bpe", vocab_size=320)


def _trained_bpe(normalizer: normalizers.Normalizer | None, pre_tokenizer: pre_tokenizers.PreTokenizer | None) -> dict:
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.normalizer, backend.pre_tokenizer = normalizer, pre_tokenizer
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=specials, limit_alphabet=40, show_progress=False)
    backend.train_from_iterator(CORPUS, trainer=trainer)
    return json.loads(backend.to_str())["model"]


def _wrap(backend: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>", pad_token="<pad>")


def _metaspace(tmp_path: Path) -> PreTrainedTokenizerFast:
    """SentencePiece-style: "▁" marks spaces, and decoding drops the first token's leading space."""
    trained = _trained_bpe(None, pre_tokenizers.Metaspace())
    backend = Tokenizer(models.BPE(trained["vocab"], [tuple(m) for m in trained["merges"]], unk_token="<unk>"))
    backend.pre_tokenizer, backend.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    return _wrap(backend)


def _byte_fallback(tmp_path: Path) -> PreTrainedTokenizerFast:
    """Llama-style: characters outside the vocabulary become <0xNN> byte tokens, decoded in runs; a run that is not
    valid UTF-8 becomes one U+FFFD per byte, so a later byte can rewrite text that decoded fine before it."""
    normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trained = _trained_bpe(normalizer, None)
    vocab = trained["vocab"]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    merges = [tuple(m) for m in trained["merges"]]
    backend = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    backend.normalizer = normalizer
    parts = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    backend.decoder = decoders.Sequence(parts)
    return _wrap(backend)


TOKENIZERS = {"byte-level": _byte_level, "metaspace": _metaspace, "byte-fallback": _byte_fallback}


def _first_stop(tokenizer, ids: list[int], stops: tuple[str, ...]) -> tuple[int, str] | None:
    """The reference: re-decode the whole text after every token."""
    for step in range(1, len(ids) + 1):
        text = cut_at_stop(decode_text(tokenizer, ids[:step]), stops)
        if text is not None:
            return step, text
    return None


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_incremental_stop_strings_equal_full_re_decoding(name: str, tmp_path: Path) -> None:
    tokenizer = TOKENIZERS[name](tmp_path)
    rng = random.Random(0)
    first_id = len(tokenizer.all_special_ids)
    texts = [*CORPUS[:4], "žluťoučký kůň 🦀 fell", "ďábelské ódy 🐍 ok"]  # characters the vocabularies lack
    streams = [tokenizer.encode(" " + text, add_special_tokens=False) for text in texts]
    steps = min(len(ids) for ids in streams)
    streams = [ids[:steps] for ids in streams]
    streams += [[rng.randrange(first_id, len(tokenizer)) for _ in range(steps)] for _ in range(12)]  # any bytes
    spanning = 0
    for round_ in range(12):
        stops = []
        for ids in streams:  # a piece of some row's full text, often across token boundaries
            text = decode_text(tokenizer, ids)
            if len(text) < 6:  # random byte tokens can decode to almost nothing
                continue
            start = rng.randrange(len(text) - 4)
            stops.append(text[start : start + rng.randrange(1, 5)])
        stops = tuple(rng.sample(stops, 2)) if round_ % 2 else (stops[round_ % len(stops)],)
        want = [_first_stop(tokenizer, ids, stops) for ids in streams]
        found = StopStrings(tokenizer, stops, len(streams), eos_token_id=None)
        got: list[tuple[int, str] | None] = [None] * len(streams)
        for step in range(1, steps + 1):
            for row in found.feed([ids[step - 1] for ids in streams]):
                got[row] = (step, found.texts[row])
        assert got == want
        spanning += sum(
            w is not None and all(s not in tokenizer.decode([ids[w[0] - 1]]) for s in stops)
            for w, ids in zip(want, streams, strict=True)
        )
    assert spanning > 0  # non-vacuous: many stops were completed by a token that does not hold them whole


@pytest.mark.parametrize(
    ("name", "tokens", "stops", "want"),
    [  # "é" as two tokens, whose first alone decodes to U+FFFD
        ("byte-level", [*"caf", "Ã", "©", "!"], ("fé",), (5, "ca")),
        ("byte-level", [*"caf", "Ã", "©", "!"], ("é!",), (6, "caf")),
        # a third byte turns the run "é" + 0xE4 into three U+FFFD: "é" is gone from the text, "f\ufffd" appears
        ("byte-fallback", ["▁", "c", "<0xC3>", "<0xA9>", "<0xE4>", "!"], ("é!",), None),
        ("byte-fallback", ["▁", "c", "<0xC3>", "<0xA9>", "<0xE4>", "!"], ("c\ufffd\ufffd",), (5, "")),
    ],
)
def test_stop_strings_through_split_characters(name: str, tokens: list[str], stops: tuple[str, ...], want, tmp_path):
    tokenizer = TOKENIZERS[name](tmp_path)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    assert _first_stop(tokenizer, ids, stops) == want
    found = StopStrings(tokenizer, stops, 1, eos_token_id=None)
    hits = [step for step, token in enumerate(ids, start=1) if found.feed([token])]
    assert (None if not hits else (hits[0], found.texts[0])) == want


def test_stop_strings_skip_rows_after_their_eos(tmp_path: Path) -> None:
    tokenizer = _byte_level(tmp_path)
    ids = tokenizer.encode(" red circle", add_special_tokens=False)
    found = StopStrings(tokenizer, ("circle",), 2, eos_token_id=tokenizer.eos_token_id)
    hits = [found.feed([tokenizer.eos_token_id if step == 0 else token, token]) for step, token in enumerate(ids)]
    assert [row for step in hits for row in step] == [1] and found.texts == {1: "red "}


def test_step_times_use_the_rows_own_last_step() -> None:
    clock = StepClock(torch.device("cpu"))
    for _ in range(3):
        clock.mark()
    seconds = clock.seconds()
    assert len(seconds) == 3 and seconds == sorted(seconds) and seconds[0] > 0
    assert step_times([0.5, 0.7, 1.1, 1.2], 1) == (500.0, None)
    ttft, ms = step_times([0.5, 0.7, 1.1, 1.2], 3)
    assert ttft == 500.0 and ms == pytest.approx(300.0)


@pytest.fixture(scope="module")
def tok(tiny_shapes: Path):
    return load_tokenizer(tiny_shapes / "tokenizer")


def test_rows_ending_differently_in_one_batch_equal_each_alone(tok) -> None:
    """One batch: a row hits EOS, one a stop string, one the model's context, one max_new_tokens; every row's
    tokens, text and reason are those it gets alone."""
    model = _never_eos(build_skip(tok), tok)
    gen = VLMGenerator(model, tok)
    a, c, d = _images(3, seed=1)
    requests = [
        Request("What colour is the circle?", a),
        Request("Is there a red square?"),
        Request("<image>\nIs there a red square in this picture or not, tell me, and what else is there?", c),
        Request("How many?", d),
    ]
    lengths = [len(e.ids) for e in gen.encode(requests)]
    assert lengths[2] > max(lengths[:2] + lengths[3:]) + 3
    model.backbone.config.max_position_embeddings = lengths[2] + 4  # row 2 has room for 4 tokens, the others for 6
    [plain] = gen.generate([requests[1]], GenerationConfig(max_new_tokens=6))
    stop = tok.decode(plain.token_ids[1:3], skip_special_tokens=True)  # two tokens' text
    config = GenerationConfig(max_new_tokens=6, stop=(stop,))

    calls = []

    def eos_in_row_0(module, args, logits):  # from the third forward on, the first row of the batch picks EOS
        calls.append(1)
        if len(calls) < 3:
            return logits
        logits = logits.clone()
        logits[0, :, tok.eos_token_id] = 1e4
        return logits

    def generate(reqs: list[Request], eos_row_0: bool):
        calls.clear()
        handle = model.backbone.lm_head.register_forward_hook(eos_in_row_0) if eos_row_0 else None
        try:
            return gen.generate(reqs, copy.deepcopy(config), batch_size=4)
        finally:
            if handle is not None:
                handle.remove()

    together = generate(requests, eos_row_0=True)
    alone = [generate([r], eos_row_0=i == 0)[0] for i, r in enumerate(requests)]
    assert [g.stats.finish_reason for g in together] == ["eos", "stop", "context", "length"]
    assert [len(g.token_ids) for g in together] == [2, 3, 4, 6]
    for x, y in zip(together, alone, strict=True):
        assert (x.token_ids, x.text, x.stats.finish_reason) == (y.token_ids, y.text, y.stats.finish_reason)
        assert x.stats.generated_tokens == len(x.token_ids)
