"""LLaVA-Instruct records: reading the JSON or JSONL file, checking every record, and turning an accepted one into
the WebDataset sample the training loader reads (docs/data.md "Converting LLaVA data").

A record is ``{"id", "image": PATH or [PATH, ...] (optional), "conversations": [{"from", "value"}, ...]}``: an
optional first ``system`` turn, then human/gpt turns alternating, human first and gpt last, with one ``<image>``
placeholder per image in its human turns (and none elsewhere). Checking is pure: the same record and settings give
the same verdict in any process, so the converter can check in parallel and still write byte-identical output. A
record that cannot be used is *rejected* with one of :data:`REASONS` and a detail; only a file that is not LLaVA
JSON at all stops the conversion (:class:`LlavaInputError`).

The sample's json keeps the conversation as the loader encodes it (a single image without ``<image>`` gets
``<image>\\n`` prepended to the first human turn, as LLaVA does; a system turn moves to ``system``) plus the
original ``id`` and image paths, ``modality`` (image or text), ``length`` (the words of its human and gpt
turns, LLaVA's ``modality_lengths``) and, when a tokenizer is given, ``num_tokens``. Images keep their bytes when
they are JPEG, PNG or WebP (the loader reads those members); any other format PIL reads is re-encoded losslessly as
PNG. The check decodes every image; building a sample reads a kept format's header only.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from skipvision.data.samples import IMAGE_PLACEHOLDER, image_member, turn_order_problem
from skipvision.errors import SkipvisionError

if TYPE_CHECKING:  # the CLI's parser is built without transformers (docs/cli.md "Startup")
    from transformers import PreTrainedTokenizerBase

# Why a record is rejected (rejected.jsonl's ``reason``), in the order the checks run.
REASONS = (
    "bad_record",  # not an object; an image that is not a path; a turn without a string from/value
    "no_turns",  # no conversations, or only a system turn
    "bad_turn_order",  # not human/gpt alternating, human first and gpt last (a system turn only first)
    "empty_answer",  # a gpt turn with no text
    "placeholder_mismatch",  # <image> in a gpt or system turn; human turns' placeholders != images
    "missing_image",  # an image file that does not exist under --images
    "unreadable_image",  # PIL cannot decode it: not an image, truncated, corrupt, a decompression bomb
    "unencodable",  # the chat template refuses the conversation (e.g. a system turn it does not support)
    "too_long",  # more tokens than --max-tokens
)
# Formats whose bytes are kept, with their member extension (all in skipvision.data.samples.IMAGE_EXTENSIONS);
# MPO is a JPEG with extra frames that PIL reports as its own format.
KEPT_FORMATS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}
PNG_MODES = ("1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA")  # modes PIL writes to PNG as they are


class LlavaInputError(SkipvisionError, ValueError):
    """The input file is not LLaVA-Instruct JSON (a list of records) or JSONL (one record a line), or the
    conversion settings are invalid."""


class Rejected(Exception):
    """A record the converter cannot use: ``reason`` is one of :data:`REASONS`, ``detail`` says what is wrong."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class Record:
    """One input record: its position among the records, its line in a JSONL file (None for JSON) and its data."""

    index: int
    line: int | None
    data: Any


@dataclass(frozen=True)
class Conversation:
    """A record's usable content: the human/gpt turns as the loader encodes them, its system turn and images."""

    id: Any
    images: list[str]
    turns: list[dict[str, str]]
    system: str | None


@dataclass(frozen=True)
class Verdict:
    """The outcome of checking one record: accepted (``reason`` None, ``num_tokens`` with a tokenizer) or not."""

    index: int
    num_tokens: int | None = None
    reason: str | None = None
    detail: str | None = None


@dataclass(frozen=True)
class CheckSettings:
    """What a check needs besides the record (picklable, sent to the worker processes)."""

    images: str
    tokenizer: str | None = None
    chat_template: str = "auto"
    max_tokens: int | None = None
    image_tokens: int = 576


def read_records(path: Path) -> list[Record]:
    """The records of a LLaVA JSON file (a list) or, for a ``.jsonl`` file, one JSON value per non-blank line.
    Raises :class:`LlavaInputError` naming the line for text that is not JSON, or a JSON file that is no list."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise LlavaInputError(f"{path} is not UTF-8 text (byte {err.start}): not LLaVA JSON") from None
    if path.suffix.lower() == ".jsonl":
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append(Record(len(records), number, json.loads(line)))
                except json.JSONDecodeError as err:
                    raise LlavaInputError(f"{path} line {number} is not valid JSON: {err.msg}") from None
        return records
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise LlavaInputError(
            f"{path} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg}); a file of one record per "
            "line must be named .jsonl"
        ) from None
    if not isinstance(data, list):
        raise LlavaInputError(f"{path} holds a JSON {type(data).__name__}, not a list of LLaVA records")
    return [Record(index, None, item) for index, item in enumerate(data)]


def _image_paths(value: Any) -> list[str]:
    paths = [] if value is None else [value] if isinstance(value, str) else value
    if not isinstance(paths, list) or not all(isinstance(p, str) and p for p in paths):
        raise Rejected("bad_record", f"'image' must be a path or a list of paths, got {json.dumps(value)[:80]}")
    return paths


def parse_record(data: Any) -> Conversation:
    """The conversation of one record, with ``<image>`` prepended where LLaVA prepends it; raises
    :class:`Rejected` for everything that can be told without reading files."""
    if not isinstance(data, dict):
        raise Rejected("bad_record", f"a record must be a JSON object, got {type(data).__name__}")
    images = _image_paths(data.get("image"))
    turns = data.get("conversations")
    if turns is None or turns == []:
        raise Rejected("no_turns", "no conversations")
    if not isinstance(turns, list):
        raise Rejected("bad_record", f"'conversations' must be a list, got {type(turns).__name__}")
    for i, turn in enumerate(turns):
        if not (isinstance(turn, dict) and isinstance(turn.get("from"), str) and isinstance(turn.get("value"), str)):
            raise Rejected("bad_record", f"turn {i} is not {{'from': str, 'value': str}}")
    system = turns[0]["value"] if turns[0]["from"] == "system" else None
    offset = int(system is not None)
    chat = [{"from": t["from"], "value": t["value"]} for t in turns[offset:]]
    if not chat:
        raise Rejected("no_turns", "only a system turn")
    problem = turn_order_problem(chat, offset)
    if problem is not None:
        raise Rejected("bad_turn_order", problem)
    for i, turn in enumerate(chat):
        if turn["from"] == "gpt" and not turn["value"].strip():
            raise Rejected("empty_answer", f"turn {i + offset} (gpt) is empty")
    for i, turn in enumerate(turns):  # an image in an answer or the system prompt would train on the wrong text
        if turn["from"] != "human" and IMAGE_PLACEHOLDER in turn["value"]:
            raise Rejected(
                "placeholder_mismatch", f"turn {i} ({turn['from']}) has {IMAGE_PLACEHOLDER}; only human turns may"
            )
    placeholders = sum(t["value"].count(IMAGE_PLACEHOLDER) for t in chat)
    if placeholders == 0 and len(images) == 1:
        chat[0]["value"] = f"{IMAGE_PLACEHOLDER}\n{chat[0]['value']}"
        placeholders = 1
    if placeholders != len(images):
        raise Rejected(
            "placeholder_mismatch", f"{placeholders} {IMAGE_PLACEHOLDER} placeholder(s), {len(images)} image(s)"
        )
    return Conversation(data.get("id"), images, chat, system)


def _read_image(folder: Path, relative: str) -> bytes:
    """The image file's bytes; :class:`Rejected` when it is missing."""
    path = folder / relative
    if not path.is_file():
        raise Rejected("missing_image", f"{relative} not found under {folder}")
    return path.read_bytes()


def _open_image(relative: str, data: bytes, decode: bool) -> Image.Image:
    """The image of ``data``: its header read, and with ``decode`` its pixels too (what finds a truncated or corrupt
    file); :class:`Rejected` when PIL cannot."""
    try:
        image = Image.open(io.BytesIO(data))  # not closed: a closed image cannot be re-encoded; no file is held
        if decode:
            image.load()
    except Exception as err:  # PIL reports bad files with many exception types (OSError, SyntaxError, ...)
        raise Rejected("unreadable_image", f"{relative}: {type(err).__name__}: {err}") from None
    return image


class Checker:
    """Checks records: structure, images, and the token count with the tokenizer's chat template, the count the
    training loader (:class:`skipvision.data.pipeline.SampleEncoder`) gets with ``image_tokens`` slots per image
    and no recipe system prompt. The tokenizer loads on first use, in the process that checks."""

    def __init__(self, settings: CheckSettings) -> None:
        self.settings = settings
        self._tokenizer: PreTrainedTokenizerBase | None = None

    def tokenizer(self) -> PreTrainedTokenizerBase:
        if self._tokenizer is None:
            from skipvision.data.tokenizer import load_tokenizer, prepare_tokenizer

            self._tokenizer = prepare_tokenizer(load_tokenizer(self.settings.tokenizer), self.settings.chat_template)
        return self._tokenizer

    def __call__(self, record: Record) -> Verdict:
        try:
            conversation = parse_record(record.data)
            for relative in conversation.images:
                _open_image(relative, _read_image(Path(self.settings.images), relative), decode=True)
            tokens = None if self.settings.tokenizer is None else self._count_tokens(conversation)
        except Rejected as rejected:
            return Verdict(record.index, reason=rejected.reason, detail=rejected.detail)
        return Verdict(record.index, num_tokens=tokens)

    def _count_tokens(self, conversation: Conversation) -> int:
        from jinja2 import TemplateError

        from skipvision.data.chat import encode_conversation
        from skipvision.data.tokenizer import IMAGE_TOKEN

        tokenizer, limit = self.tokenizer(), self.settings.max_tokens
        try:
            encoded = encode_conversation(
                tokenizer,
                conversation.turns,
                self.settings.image_tokens,
                len(conversation.images),
                tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                conversation.system,
            )
        except (SkipvisionError, TemplateError) as err:
            raise Rejected("unencodable", str(err)) from None
        count = len(encoded.input_ids)
        if limit is not None and count > limit:
            raise Rejected("too_long", f"{count} tokens, over --max-tokens {limit}")
        return count


def _member(relative: str, data: bytes) -> tuple[str, bytes]:
    """(extension, bytes) of one image member, for an image the check decoded: the original bytes for a kept
    format (found from the header, with no second decode), else lossless PNG (the first frame of an animation; a
    mode PNG cannot hold, such as CMYK, becomes RGB as the loader would make it)."""
    image = _open_image(relative, data, decode=False)
    if image.format in KEPT_FORMATS:
        return KEPT_FORMATS[image.format], data
    image = _open_image(relative, data, decode=True)
    if image.mode not in PNG_MODES:
        image = image.convert("RGB")
    out = io.BytesIO()
    image.save(out, format="PNG")
    return "png", out.getvalue()


def sample_key(index: int) -> str:
    """A sample's WebDataset key: the record's index, zero-padded (the original id goes into the json)."""
    return f"{index:09d}"


def build_sample(record: Record, num_tokens: int | None, images: str) -> dict[str, Any]:
    """The WebDataset sample of an accepted record: ``json`` and ``img000.<ext>``, ``img001.<ext>``, ... in
    placeholder order (the loader takes image members in sorted name order; :func:`image_member` widens the
    numbers from 1000 images on). Raises :class:`Rejected` when an image is gone or unreadable since the check."""
    conversation = parse_record(record.data)
    meta: dict[str, Any] = {
        "id": conversation.id,
        "images": conversation.images,
        "conversations": conversation.turns,
        "modality": "image" if conversation.images else "text",
        "length": sum(len(t["value"].split()) for t in conversation.turns),
    }
    if conversation.system is not None:
        meta["system"] = conversation.system
    if num_tokens is not None:
        meta["num_tokens"] = num_tokens
    sample: dict[str, Any] = {"__key__": sample_key(record.index), "json": json.dumps(meta, sort_keys=True).encode()}
    for i, relative in enumerate(conversation.images):
        extension, data = _member(relative, _read_image(Path(images), relative))
        sample[image_member(i, len(conversation.images), extension)] = data
    return sample
