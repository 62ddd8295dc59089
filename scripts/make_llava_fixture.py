"""A small dataset in LLaVA-Instruct's format, drawn by the shapes generator, to try the real-data path on: convert
(``skipvision data llava``), fit, evaluate (docs/data.md "A LLaVA-format fixture").

    bash scripts/venv-run python scripts/make_llava_fixture.py --out data/llava-fixture [--num 48] [--seed 0]

Writes into ``--out``:

- ``llava.json``: ``--num`` records. Most ask 1-3 questions about one PNG; the others are the cases a converter must
  handle: a 2-image and a 12-image sample (interleaved ``<image>``), a text-only one, three without ``<image>`` (the
  converter prepends it), one with a system turn, a BMP (re-encoded as PNG) and a JPEG image, and one bad record of
  each kind :data:`BAD` lists, which the converter rejects with that reason.
- ``images/``: the image files the records name, relative to this folder (``--images DIR/images``).
- ``eval.jsonl``: questions about images of their own, one a line: ``{"id", "image": "images/...", "question",
  "answer", "category"}`` (the question type).
- ``tokenizer/``: a small BPE tokenizer trained on the fixture's text (for ``--tokenizer`` and a recipe's
  ``data.tokenizer``).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

from PIL import Image

from skipvision.data.shapes import make_sample

IMAGE_SIZE = 64
# The bad records, by id, and the reason the converter rejects each with.
BAD = {
    "bad-missing-image": "missing_image",
    "bad-truncated-image": "unreadable_image",
    "bad-turn-order": "bad_turn_order",
    "bad-empty-answer": "empty_answer",
    "bad-placeholders": "placeholder_mismatch",
    "bad-no-turns": "no_turns",
}
NO_PLACEHOLDER = ("no-placeholder-0", "no-placeholder-1", "no-placeholder-2")
MULTI = {"multi-2": 2, "multi-12": 12}
TEXT_ONLY = {
    "id": "text-only",
    "conversations": [
        {"from": "human", "value": "Which colour do red and yellow make when mixed?"},
        {"from": "gpt", "value": "orange"},
    ],
}
SYSTEM = "Answer with one word."
SPECIAL = len(BAD) + len(NO_PLACEHOLDER) + len(MULTI) + 4  # + text-only, system, bmp, jpg


class Fixture:
    """Writes the fixture's images; every record is built from one shapes sample drawn from the shared ``rng``."""

    def __init__(self, out: Path, seed: int) -> None:
        self.out, self.rng = out, random.Random(seed)
        (out / "images").mkdir(parents=True, exist_ok=True)

    def image(self, name: str, image: Image.Image, fmt: str = "PNG") -> str:
        """Save ``image`` as ``images/<name>`` in ``fmt``; returns the path relative to ``images/``."""
        path = self.out / "images" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
        return name

    def record(self, rid: str, questions: int = 1, fmt: str = "PNG", extension: str = "png") -> dict[str, Any]:
        """A one-image record with up to ``questions`` question turns, its image saved as ``<rid>.<extension>``."""
        image, sample = make_sample(self.rng, IMAGE_SIZE, questions=questions)
        return {
            "id": rid,
            "image": self.image(f"{rid}.{extension}", image, fmt),
            "conversations": sample["conversations"],
        }

    def multi(self, rid: str, count: int) -> dict[str, Any]:
        """``count`` images, one ``<image>`` each in order, and a question about the last one; the second image
        is a JPEG, the rest PNGs."""
        paths, question, answer = [], "", ""
        for i in range(count):
            image, sample = make_sample(self.rng, IMAGE_SIZE)
            fmt, extension = ("JPEG", "jpg") if i == 1 else ("PNG", "png")
            paths.append(self.image(f"multi/{rid}-{i:02d}.{extension}", image, fmt))
            question = sample["conversations"][0]["value"].removeprefix("<image>\n")
            answer = sample["conversations"][1]["value"]
        prompt = "".join(f"Image {i + 1}: <image>\n" for i in range(count)) + f"About image {count}: {question}"
        return {"id": rid, "image": paths, "conversations": [_turn("human", prompt), _turn("gpt", answer)]}


def _turn(role: str, value: str) -> dict[str, str]:
    return {"from": role, "value": value}


def _bad_records(fixture: Fixture) -> list[dict[str, Any]]:
    """One record of each kind in :data:`BAD`, each otherwise valid."""
    bad = [fixture.record(rid) for rid in BAD]
    by_id = {r["id"]: r for r in bad}
    (fixture.out / "images" / by_id["bad-missing-image"]["image"]).unlink()
    truncated = fixture.out / "images" / by_id["bad-truncated-image"]["image"]
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    turns = by_id["bad-turn-order"]["conversations"]
    turns[0], turns[1] = turns[1], turns[0]
    by_id["bad-empty-answer"]["conversations"][-1]["value"] = " "
    by_id["bad-placeholders"]["conversations"][0]["value"] = "<image>\n<image>\nWhich of the two shows a circle?"
    by_id["bad-no-turns"]["conversations"] = []
    return bad


def make_fixture(out: str | Path, num: int = 48, seed: int = 0, num_eval: int = 16) -> dict[str, Path]:
    """Write the fixture (module docstring) into ``out``; returns the paths of its parts."""
    if num <= SPECIAL:
        raise ValueError(f"--num must be above {SPECIAL}, the special records, got {num}")
    out = Path(out)
    fixture = Fixture(out, seed)
    records = [fixture.record(f"shapes-{i:03d}", questions=1 + i % 3) for i in range(num - SPECIAL)]
    records += [fixture.multi(rid, count) for rid, count in MULTI.items()]
    records.append(TEXT_ONLY)
    for rid in NO_PLACEHOLDER:
        record = fixture.record(rid)
        record["conversations"][0]["value"] = record["conversations"][0]["value"].removeprefix("<image>\n")
        records.append(record)
    system = fixture.record("system")
    system["conversations"].insert(0, _turn("system", SYSTEM))
    records += [
        system,
        fixture.record("bmp", fmt="BMP", extension="bmp"),
        fixture.record("jpg", fmt="JPEG", extension="jpg"),
    ]
    records += _bad_records(fixture)
    (out / "llava.json").write_text(json.dumps(records, indent=1) + "\n")

    questions = []
    for i in range(num_eval):
        image, sample = make_sample(fixture.rng, IMAGE_SIZE)
        path = "images/" + fixture.image(f"eval/eval-{i:03d}.png", image)
        question = sample["conversations"][0]["value"].removeprefix("<image>\n")
        answer = sample["conversations"][1]["value"]
        questions.append(
            {"id": f"eval-{i:03d}", "image": path, "question": question, "answer": answer, "category": sample["qtype"]}
        )
    (out / "eval.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))

    from skipvision.data.tokenizer import TEMPLATE_TEXTS, train_tokenizer

    texts = [t["value"] for r in records for t in r.get("conversations", [])] + [q["question"] for q in questions]
    train_tokenizer([*texts, SYSTEM, *TEMPLATE_TEXTS], out / "tokenizer", vocab_size=300)
    return {
        "json": out / "llava.json",
        "images": out / "images",
        "eval": out / "eval.jsonl",
        "tokenizer": out / "tokenizer",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="a new folder")
    parser.add_argument("--num", type=int, default=48, help=f"records in llava.json (more than {SPECIAL})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-eval", type=int, default=16, help="questions in eval.jsonl")
    args = parser.parse_args()
    if Path(args.out).exists() and any(Path(args.out).iterdir()):
        parser.error(f"--out {args.out} is not empty")
    paths = make_fixture(args.out, args.num, args.seed, args.num_eval)
    print(
        f"wrote {args.num} records to {paths['json']}, their images to {paths['images']}, "
        f"{args.num_eval} questions to {paths['eval']} and a tokenizer to {paths['tokenizer']}"
    )


if __name__ == "__main__":
    main()
