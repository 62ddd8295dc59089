"""Deterministic synthetic visual question answering: coloured shapes on a dark background.

"shapes" is the project's smoke-test dataset: small enough to generate offline in seconds, yet each
answer depends on the image, so a vision-language model only beats the answer prior if its vision
path actually works. Each sample is one image with 1-4 non-overlapping shapes and one question of one
of five types (colour, shape, count, position, existence) with a one-word answer. Question types are
drawn uniformly and yes/no answers are balanced, so no prior-only shortcut scores well.

Everything derives from ``random.Random(seed)``: the same seed gives the same samples. Samples are
stored LLaVA-style in WebDataset tar shards; the json also keeps the scene (``objects``) so answers
can be checked.

:class:`ShapesSettings` is the one definition of the generator's settings and their defaults: it is a recipe's
``data.shapes`` section, the defaults of ``python -m skipvision data shapes`` and the arguments of
:func:`generate_shapes`. This module imports webdataset and the tokenizer (both pull in torch) only when it writes
a dataset, so the recipe schema and the CLI can read the settings cheaply.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import random
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from skipvision.errors import OutputExistsError

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 100, 240),
    "yellow": (240, 230, 50),
    "purple": (160, 60, 210),
    "orange": (250, 140, 20),
}
SHAPES = ("circle", "square", "triangle")
QUESTION_TYPES = ("colour", "shape", "count", "position", "existence")
DESCRIBE_QUESTION = "Describe the image."
NUMBER_WORDS = ("zero", "one", "two", "three", "four")
MAX_OBJECTS = 4
META_VERSION = 1
# Seed offset for the val split so it never repeats train samples.
VAL_SEED_OFFSET = 1_000_003


@dataclass
class ShapesSettings:
    """How the synthetic set is generated (a recipe's ``data.shapes`` section; see the module docstring)."""

    generate: bool = True  # recipe only: fit/validate generate the set into data.root when it is missing
    num_train: int = 20000
    num_val: int = 1000
    image_size: int = 64
    seed: int = 0
    shard_size: int = 1000
    vocab_size: int = 512
    train_questions: int = 1  # question turns per training image (validation always asks one)
    train_describe: bool = False  # append a caption turn ("red circle, blue square") to training images


# The settings a generated set records in its meta.json, so a recipe can tell whether the set on disk is its own.
RECORDED_SETTINGS = ("num_train", "num_val", "seed", "image_size", "shard_size", "train_questions", "train_describe")

Scene = list[dict[str, Any]]


def _place_objects(rng: random.Random, image_size: int) -> Scene | None:
    """Place 1-4 shapes whose bounding boxes keep a small gap, or None if one did not fit in 50 tries."""
    min_size, max_size = round(image_size * 14 / 64), round(image_size * 20 / 64)
    gap = max(1, image_size // 32)
    objects: Scene = []
    for _ in range(rng.randint(1, MAX_OBJECTS)):
        for _attempt in range(50):
            size = rng.randint(min_size, max_size)
            half = size // 2
            x = rng.randint(half + gap, image_size - 1 - half - gap)
            y = rng.randint(half + gap, image_size - 1 - half - gap)
            # Boxes are disjoint when they are separated along at least one axis.
            if all(max(abs(x - o["x"]), abs(y - o["y"])) > half + o["size"] // 2 + gap for o in objects):
                colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
                objects.append({"colour": colour, "shape": shape, "x": x, "y": y, "size": size})
                break
        else:
            return None
    return objects


def _draw_scene(rng: random.Random, image_size: int) -> tuple[Image.Image, Scene]:
    """Draw 1-4 shapes on dark grey; each spans ``x ± size // 2``, ``y ± size // 2`` (centre x, y)."""
    while (objects := _place_objects(rng, image_size)) is None:
        pass
    grey = rng.randint(20, 60)
    image = Image.new("RGB", (image_size, image_size), tuple(grey + rng.randint(-6, 6) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    for o in objects:
        half, fill = o["size"] // 2, COLOURS[o["colour"]]
        box = (o["x"] - half, o["y"] - half, o["x"] + half, o["y"] + half)
        if o["shape"] == "circle":
            draw.ellipse(box, fill=fill)
        elif o["shape"] == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(o["x"], box[1]), (box[0], box[3]), (box[2], box[3])], fill=fill)
    return image, objects


def _ask(rng: random.Random, qtype: str, objects: Scene, image_size: int) -> tuple[str, str] | None:
    """Return (question, answer) of type ``qtype`` about ``objects``, or None if the scene cannot support it.

    Only unambiguous questions are produced; ``image_size`` sets the minimum gap for position questions.
    """

    def count(key: str, value: str) -> int:
        return sum(o[key] == value for o in objects)

    if qtype == "colour":
        unique = [o for o in objects if count("shape", o["shape"]) == 1]
        if not unique:
            return None
        o = rng.choice(unique)
        return f"What colour is the {o['shape']}?", o["colour"]
    if qtype == "shape":
        unique = [o for o in objects if count("colour", o["colour"]) == 1]
        if not unique:
            return None
        o = rng.choice(unique)
        return f"What shape is the {o['colour']} object?", o["shape"]
    if qtype == "count":
        shape = rng.choice((None, *SHAPES))
        if shape is None:
            return "How many shapes are there?", NUMBER_WORDS[len(objects)]
        return f"How many {shape}s are there?", NUMBER_WORDS[count("shape", shape)]
    if qtype == "position":
        axis, relation = rng.choice((("x", "left of"), ("y", "above")))
        described = [
            o for o in objects if sum(o["colour"] == p["colour"] and o["shape"] == p["shape"] for p in objects) == 1
        ]
        # Pairs (a, b) with a clearly left of / above b, so the answer is unambiguous to the eye.
        pairs = [(a, b) for a in described for b in described if b[axis] - a[axis] >= image_size // 8]
        if not pairs:
            return None
        a, b = rng.choice(pairs)
        answer = rng.choice(("yes", "no"))
        if answer == "no":
            a, b = b, a
        return f"Is the {a['colour']} {a['shape']} {relation} the {b['colour']} {b['shape']}?", answer
    if qtype == "existence":
        present = {(o["colour"], o["shape"]) for o in objects}
        answer = rng.choice(("yes", "no"))
        if answer == "yes":
            colour, shape = rng.choice(sorted(present))
        else:
            colour, shape = rng.choice([(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present])
        article = "an" if colour[0] in "aeiou" else "a"
        return f"Is there {article} {colour} {shape}?", answer
    raise ValueError(f"unknown question type {qtype!r}; expected one of {QUESTION_TYPES}")


def describe_scene(objects: Scene, image_size: int) -> str:
    """Caption listing every object as "colour shape" in reading order (rows of a quarter image, then x)."""
    ordered = sorted(objects, key=lambda o: (o["y"] // max(1, image_size // 4), o["x"]))
    return ", ".join(f"{o['colour']} {o['shape']}" for o in ordered)


def make_sample(
    rng: random.Random, image_size: int, questions: int = 1, describe: bool = False
) -> tuple[Image.Image, dict[str, Any]]:
    """Draw one scene and ``questions`` questions about it (a multi-turn conversation, one image).

    The first question's type is drawn uniformly and the scene is redrawn until it is askable; further turns
    take the other types in random order, skipping those the scene cannot support, without repeating a question.
    ``describe`` appends a caption turn naming every object (dense colour+shape supervision, as in LLaVA's
    caption data); it comes last so no question can read its answer from the caption.
    ``qtype`` is the last turn's type (the one a single-question validation prompt is scored on).
    """
    first = rng.choice(QUESTION_TYPES)
    while True:
        image, objects = _draw_scene(rng, image_size)
        qa = _ask(rng, first, objects, image_size)
        if qa is not None:
            break
    turns, qtypes = [qa], [first]
    others = [q for q in QUESTION_TYPES if q != first]
    rng.shuffle(others)
    for qtype in others[: max(0, questions - 1)]:
        qa = _ask(rng, qtype, objects, image_size)
        if qa is not None and qa[0] not in (t[0] for t in turns):
            turns.append(qa)
            qtypes.append(qtype)
    if describe:
        turns.append((DESCRIBE_QUESTION, describe_scene(objects, image_size)))
        qtypes.append("describe")
    conversations = []
    for i, (question, answer) in enumerate(turns):
        prefix = "<image>\n" if i == 0 else ""
        conversations += [{"from": "human", "value": prefix + question}, {"from": "gpt", "value": answer}]
    sample = {"conversations": conversations, "qtype": qtypes[-1], "qtypes": qtypes, "objects": objects}
    return image, sample


def write_split(
    out_dir: Path,
    split: str,
    num_samples: int,
    seed: int,
    image_size: int,
    shard_size: int,
    questions: int = 1,
    describe: bool = False,
) -> list[str]:
    """Write ``num_samples`` samples of up to ``questions`` turns as shards ``out_dir/split/shapes-{split}-N.tar``.

    Returns the shard paths relative to ``out_dir`` (e.g. ``"train/shapes-train-000000.tar"``), in order.
    Tar member mtimes are fixed so the same seed gives byte-identical shards.
    """
    import webdataset as wds

    split_dir = Path(out_dir) / split
    split_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    pattern = str(split_dir).replace("%", "%%") + f"/shapes-{split}-%06d.tar"
    written: list[str] = []
    with wds.ShardWriter(pattern, maxcount=shard_size, verbose=0, mtime=0.0, post=written.append) as sink:
        for index in range(num_samples):
            image, sample = make_sample(rng, image_size, questions, describe)
            png = io.BytesIO()
            image.save(png, format="PNG")
            sink.write(
                {
                    "__key__": f"{split}-{index:07d}",
                    "png": png.getvalue(),
                    "json": json.dumps(sample, sort_keys=True).encode("utf-8"),
                }
            )
    return [f"{split}/{Path(fname).name}" for fname in written]


def _conversation_texts(root: Path, shards: list[str]) -> list[str]:
    """All conversation turns stored in the json members of ``shards``."""
    texts = []
    for shard in shards:
        with tarfile.open(root / shard) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    sample = json.load(tar.extractfile(member))
                    texts.extend(turn["value"] for turn in sample["conversations"])
    return texts


def generate_shapes(
    out_dir: str | Path, settings: ShapesSettings | None = None, *, overwrite: bool = False, **changes: Any
) -> dict[str, Any]:
    """Generate train/val shards, a tokenizer (``out_dir/tokenizer``) and ``out_dir/meta.json``.

    ``settings`` (default :class:`ShapesSettings`) with single fields replaced by ``changes`` (``num_train=64``);
    ``settings.generate`` is the recipe's business and ignored here. Training images carry up to
    ``train_questions`` question turns each (more supervision per image forward), plus a caption turn with
    ``train_describe``; validation samples ask one question, so accuracy per question type stays clean.

    Everything is written to a temporary sibling folder that is renamed into place at the end, so an
    interrupted run never leaves a dataset that :func:`dataset_is_complete` accepts. An existing empty
    ``out_dir`` is replaced; a non-empty one raises :class:`OutputExistsError` (a ``FileExistsError``) unless
    ``overwrite`` is set.
    Returns the meta dict.
    """
    from skipvision.data.tokenizer import TEMPLATE_TEXTS, train_tokenizer

    s = dataclasses.replace(settings or ShapesSettings(), **changes)
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise OutputExistsError(
            f"{out_dir} is not empty; pass overwrite=True (--overwrite) to regenerate the shapes dataset"
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        train_shards = write_split(
            tmp, "train", s.num_train, s.seed, s.image_size, s.shard_size, s.train_questions, s.train_describe
        )
        val_shards = write_split(tmp, "val", s.num_val, s.seed + VAL_SEED_OFFSET, s.image_size, s.shard_size)
        texts = _conversation_texts(tmp, train_shards) + list(TEMPLATE_TEXTS)
        train_tokenizer(texts, tmp / "tokenizer", vocab_size=s.vocab_size)
        meta = {
            **{name: getattr(s, name) for name in RECORDED_SETTINGS},
            "train_shards": train_shards,
            "val_shards": val_shards,
            "question_types": list(QUESTION_TYPES),
            "version": META_VERSION,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old)
        else:
            tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta


def settings_mismatch(meta: dict[str, Any], settings: ShapesSettings) -> dict[str, tuple[Any, Any]]:
    """The recorded settings in which a generated set's ``meta`` differs from ``settings``: {name: (on disk,
    wanted)}. Sets written before ``train_questions`` and ``train_describe`` existed lack them; they were generated
    with today's defaults, so a missing setting counts as its default."""
    defaults = ShapesSettings()
    on_disk = {name: meta.get(name, getattr(defaults, name)) for name in RECORDED_SETTINGS}
    return {name: (have, getattr(settings, name)) for name, have in on_disk.items() if have != getattr(settings, name)}


def dataset_is_complete(out_dir: str | Path) -> bool:
    """True if ``out_dir/meta.json`` exists and every shard it lists is on disk."""
    meta_path = Path(out_dir) / "meta.json"
    if not meta_path.is_file():
        return False
    meta = json.loads(meta_path.read_text())
    return all((Path(out_dir) / s).is_file() for s in meta["train_shards"] + meta["val_shards"])
