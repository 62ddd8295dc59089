"""Eval sets: a JSONL file, or WebDataset shards in the training data's layout (docs/evaluation.md "Eval sets").

Every item is read and checked for the task before a model loads, so a set with a missing answer, an image that is
not there or not an image, or a label the task cannot use fails at once, in one line naming the file and line (or
the shard and the sample), instead of after an hour of generation. Importing this module is cheap (the CLI's
parser imports it indirectly); shards are read through webdataset, imported when a set is read.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from skipvision.data.samples import IMAGE_PLACEHOLDER, image_keys
from skipvision.errors import MissingFileError, SkipvisionError
from skipvision.eval.metrics import normalise_exact, option_letters


class EvalDataError(SkipvisionError, ValueError):
    """An eval set or item that cannot be scored; the message names the file and line, or the shard and sample."""


@dataclass(frozen=True)
class EvalItem:
    """One question of an eval set, checked for its task."""

    id: str
    question: str  # the user message, sent as is (``<image>`` marks the image; prepended when absent)
    answer: str  # the reference; for ``choice`` its option letter, for ``yesno`` "yes" or "no"
    answers: tuple[str, ...] | None = None  # all human answers (VQAv2's 10), when the set has them
    options: Mapping[str, str] | None = None  # ``choice``: {letter: option text}
    category: str | None = None
    image: Path | bytes | None = None  # an image file, an image file's bytes (from a shard), or none
    source: str = ""  # where the item was read ("file.jsonl:3", "shard.tar: sample key"), named in errors
    system: str | None = None  # the item's own system prompt (a shard sample's ``system``); None: the model's

    @property
    def references(self) -> tuple[str, ...]:
        """The answers scored against: every human answer when there are several, else the one answer."""
        return self.answers or (self.answer,)


def read_eval_set(data: str | Path, task: str, limit: int | None = None) -> list[EvalItem]:
    """The first ``limit`` items (all when None) of a JSONL file, a converted data folder (its ``val/*.tar``, else
    its ``*.tar``), or shards given as a glob, a brace pattern or one ``.tar``; checked for ``task``."""
    text = str(data)
    path = Path(text)
    if path.is_dir():
        shards = sorted(glob.glob(str(path / "val" / "*.tar"))) or sorted(glob.glob(str(path / "*.tar")))
        if not shards:
            raise EvalDataError(f"{path} holds no shards (looked for val/*.tar and *.tar)")
        rows = _shard_rows(shards)
    elif path.suffix == ".tar" or glob.has_magic(text) or "{" in text:
        from skipvision.data.pipeline import expand_shards

        rows = _shard_rows(expand_shards(text))
    elif path.is_file():
        rows = _jsonl_rows(path)
    else:
        raise MissingFileError(f"no eval set at {path} (give a JSONL file, a data folder or shards)")
    items = []
    for row, source, image in rows:
        if limit is not None and len(items) >= limit:
            break
        items.append(check_item(row, task, source, image))
    if not items:
        raise EvalDataError(f"{data}: the eval set is empty")
    return items


def _jsonl_rows(path: Path) -> Iterator[tuple[dict[str, Any], str, Path | None]]:
    """(row, "file:line", image path) per non-empty line; an image path is relative to the file."""
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            source = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise EvalDataError(f"{source}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise EvalDataError(f"{source}: an item is a JSON object, got {type(row).__name__}")
            image = row.get("image")
            if image is not None:
                if not isinstance(image, str):
                    raise EvalDataError(f'{source}: "image" is a path or null, got {image!r}')
                image = path.parent / image
                if not image.is_file():
                    raise EvalDataError(f"{source}: no image at {image}")
                _verify_image(image, source)
            yield {**row, "id": str(row.get("id", number))}, source, image


def _verify_image(path: Path, source: str) -> None:
    """PIL's check of an image file without decoding it (its format, structure and, for PNG, checksums), so that a
    file that is not an image or is damaged fails here rather than in the middle of generation."""
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as err:  # PIL reports bad files with many exception types (OSError, SyntaxError, ...)
        raise EvalDataError(f"{source}: cannot read the image {path} ({type(err).__name__}: {err})") from None


def _shard_rows(shards: list[str]) -> Iterator[tuple[dict[str, Any], str, bytes | None]]:
    """Items of the training data's samples, one question each: the human turn is the question, the gpt turn the
    answer, the json's ``system`` the item's system prompt (``answers``, ``choices``, ``category``/``qtype`` and
    ``id`` from the json when present), the image the sample's image member. A multi-turn sample is refused: its
    earlier turns would be lost."""
    import webdataset as wds

    from skipvision.data.pipeline import check_shard

    samples = wds.DataPipeline(wds.SimpleShardList(shards), wds.map(check_shard), wds.tarfile_to_samples())
    for sample in samples:
        source = f"{sample['__url__']}: sample {sample['__key__']}"
        if "json" not in sample:
            raise EvalDataError(f"{source}: no json member")
        meta = json.loads(sample["json"])
        images = image_keys(sample)
        if len(images) > 1:
            raise EvalDataError(f"{source}: {len(images)} images; an eval item has at most one")
        turns = meta.get("conversations") or []
        humans = [t.get("value") for t in turns if t.get("from") == "human"]
        gpts = [t.get("value") for t in turns if t.get("from") == "gpt"]
        if len(humans) > 1:
            raise EvalDataError(
                f"{source}: {len(humans)} questions in one conversation; an eval item is one question (write each "
                "as an item of its own, e.g. a JSONL set, with the earlier turns in its question if it needs them)"
            )
        row = {
            **{k: meta[k] for k in ("answers", "choices", "system") if k in meta},
            "id": str(meta.get("id", sample["__key__"])),
            "question": humans[-1] if humans else None,
            "answer": gpts[-1] if gpts else None,
            "category": meta.get("category", meta.get("qtype")),
        }
        yield row, source, sample[images[0]] if images else None


def check_item(row: Mapping[str, Any], task: str, source: str, image: Path | bytes | None = None) -> EvalItem:
    """One row (``question``, ``answer`` or ``answers``, optional ``choices`` and ``category``) as an item of
    ``task``, or an :class:`EvalDataError` naming ``source`` and the problem."""
    question = row.get("question")
    if not isinstance(question, str) or not question.strip():
        raise EvalDataError(f'{source}: no "question" (a non-empty string)')
    placeholders = question.count(IMAGE_PLACEHOLDER)
    if placeholders > (1 if image is not None else 0):
        raise EvalDataError(
            f"{source}: the question has {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but the item "
            f"{'has one image' if image is not None else 'has no image'}"
        )
    answers = row.get("answers")
    if answers is not None and (not isinstance(answers, list) or not all(isinstance(a, str) for a in answers)):
        raise EvalDataError(f'{source}: "answers" is a list of strings, got {answers!r}')
    answer = row.get("answer")
    if answer is None and answers:
        answer = answers[0]
    if not isinstance(answer, str) or not answer.strip():
        raise EvalDataError(f'{source}: no answer (give "answer", a non-empty string, or "answers", a list)')
    category = row.get("category")
    system = row.get("system")
    if system is not None and not isinstance(system, str):
        raise EvalDataError(f'{source}: "system" is a string, got {system!r}')
    options = None
    if task == "choice":
        options, answer = _choice(row.get("choices"), answer, source)
    elif task == "yesno":
        answer = normalise_exact(answer)
        if answer not in ("yes", "no"):
            raise EvalDataError(f'{source}: task yesno needs the answer "yes" or "no", got {row.get("answer")!r}')
    return EvalItem(
        id=str(row["id"]),
        question=question,
        answer=answer,
        answers=tuple(answers) if answers else None,
        options=options,
        category=None if category is None else str(category),
        image=image,
        source=source,
        system=system,
    )


def _choice(choices: Any, answer: str, source: str) -> tuple[dict[str, str], str]:
    """The options as {letter: text} and the answer as its letter (the answer may be the letter or the text)."""
    if not isinstance(choices, (list, dict)) or not choices:
        raise EvalDataError(f'{source}: task choice needs "choices": a list of option texts or {{"A": text, ...}}')
    try:
        options = option_letters(choices)
    except ValueError as err:
        raise EvalDataError(f"{source}: {err}") from None
    letter = answer.strip().strip("().").upper() if len(answer.strip().strip("().")) == 1 else None
    if letter in options:
        return options, letter
    named = [key for key, text in options.items() if text.strip().lower() == answer.strip().lower()]
    if len(named) != 1:
        raise EvalDataError(f"{source}: the answer {answer!r} is neither an option letter nor one option's text")
    return options, named[0]
