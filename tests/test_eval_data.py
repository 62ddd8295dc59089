"""Reading eval sets without a model (docs/evaluation.md "Eval sets"): images checked while the set is read, shard
samples as one-question items with their own system prompt, multi-turn samples refused, and a failed request named
by its item."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from skipvision.eval.data import EvalDataError, read_eval_set
from skipvision.eval.runner import eval_request
from skipvision.inference.generator import RequestError, name_request


def _png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(out, format="PNG")
    return out.getvalue()


def test_an_image_that_is_not_one_fails_while_the_set_is_read(tmp_path: Path) -> None:
    (tmp_path / "good.png").write_bytes(_png())
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "cut.png").write_bytes(_png()[:-20])  # its last chunks cut off
    good = {"question": "What colour?", "answer": "red", "image": "good.png"}
    for name, line in (("text.png", 2), ("cut.png", 3)):
        data = tmp_path / f"{name}.jsonl"
        rows = (
            [good, {**good, "image": None}, {**good, "image": name}] if line == 3 else [good, {**good, "image": name}]
        )
        data.write_text("".join(json.dumps(row) + "\n" for row in rows))
        with pytest.raises(EvalDataError) as failed:
            read_eval_set(data, "exact")
        message = str(failed.value)
        assert message.startswith(f"{data}:{line}: cannot read the image {tmp_path / name} (") and "\n" not in message
    data = tmp_path / "good.jsonl"
    data.write_text(json.dumps(good) + "\n")
    assert read_eval_set(data, "exact")[0].image == tmp_path / "good.png"


def _shard(path: Path, samples: list[dict]) -> str:
    with wds.TarWriter(str(path)) as tar:
        for key, meta in enumerate(samples):
            tar.write({"__key__": f"{key:09d}", "json": json.dumps(meta).encode(), "img000.png": _png()})
    return str(path)


def _turns(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    return [turn for q, a in pairs for turn in ({"from": "human", "value": q}, {"from": "gpt", "value": a})]


def test_a_shard_sample_is_one_question_with_its_own_system_prompt(tmp_path: Path) -> None:
    meta = {"id": "s", "system": "Answer in one word.", "conversations": _turns(("<image>\nWhat colour?", "red"))}
    plain = {"id": "p", "conversations": _turns(("<image>\nWhich shape?", "circle"))}
    items = read_eval_set(_shard(tmp_path / "set.tar", [meta, plain]), "exact")
    assert [(i.id, i.question, i.answer, i.system) for i in items] == [
        ("s", "<image>\nWhat colour?", "red", "Answer in one word."),
        ("p", "<image>\nWhich shape?", "circle", None),
    ]
    requests = [eval_request(item) for item in items]
    assert [(r.prompt, r.system) for r in requests] == [
        ("<image>\nWhat colour?", "Answer in one word."),
        ("<image>\nWhich shape?", None),  # None: the model's own system prompt
    ]
    assert all(isinstance(r.image, Image.Image) for r in requests)


def test_a_multi_turn_shard_sample_is_refused_naming_it(tmp_path: Path) -> None:
    two = {"id": "two", "conversations": _turns(("<image>\nWhat colour?", "red"), ("And the shape?", "circle"))}
    shard = _shard(tmp_path / "set.tar", [{"conversations": _turns(("<image>\nWhat colour?", "red"))}, two])
    with pytest.raises(EvalDataError) as failed:
        read_eval_set(shard, "exact")
    assert str(failed.value) == (
        f"{shard}: sample 000000001: 2 questions in one conversation; an eval item is one question (write each as an "
        "item of its own, e.g. a JSONL set, with the earlier turns in its question if it needs them)"
    )


def test_a_failed_request_is_named_by_its_item() -> None:
    names = ["set.jsonl:1", "set.jsonl:2"]
    unreadable = RequestError("request 1: cannot read image x.png: truncated")
    assert name_request(unreadable, names) == "set.jsonl:2: cannot read image x.png: truncated"
    long = RequestError("request 0 has 900 tokens (image slots included) but the model's context is 512 positions")
    assert name_request(long, names) == (
        "set.jsonl:1: the prompt has 900 tokens (image slots included) but the model's context is 512 positions"
    )
    assert name_request(RequestError("something else"), names) == "something else"
    assert name_request(RequestError("request 7: out of range"), names) == "request 7: out of range"
