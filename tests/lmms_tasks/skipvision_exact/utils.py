"""The skipvision_exact task's document functions (docs/evaluation.md "lmms-eval"): a `skipvision eval` JSONL item
as lmms-eval's document, prompt, image and score, each as `skipvision eval --task exact` has it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image

from skipvision.eval.metrics import exact_match

HERE = Path(__file__).resolve().parent  # eval.jsonl and its images sit beside this file


def doc_to_visual(doc: dict[str, Any]) -> list[Image.Image]:
    """The item's image (its path is relative to eval.jsonl), or none."""
    return [] if doc["image"] is None else [Image.open(HERE / doc["image"]).convert("RGB")]


def doc_to_text(doc: dict[str, Any]) -> str:
    """The user message: the question as written (skipvision eval without --instruction)."""
    return doc["question"]


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    return {"exact_match": exact_match(results[0], [doc["answer"]])}
