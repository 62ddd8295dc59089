"""Tasks: each item's score and each category's metrics from the predictions (docs/evaluation.md "Metrics").

The per-item rules and the metrics are the pure functions of :mod:`.metrics`; this module applies them to
:class:`~skipvision.eval.data.EvalItem` lists and breaks them down by category ("overall" is every item).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from statistics import fmean

from skipvision.eval.data import EvalItem
from skipvision.eval.metrics import (
    caption_metrics,
    choice_letter,
    exact_match,
    pope_answer,
    vqa_accuracy,
    yesno_metrics,
)

TASKS = ("vqa", "choice", "yesno", "exact", "caption")
# Per task: the metric names of a category, in table order, and the default generation budget in tokens.
METRICS = {
    "vqa": ("accuracy", "count"),
    "choice": ("accuracy", "unparsed", "count"),
    "yesno": ("accuracy", "precision", "recall", "f1", "yes_ratio", "count"),
    "exact": ("accuracy", "count"),
    "caption": ("bleu4", "chrf", "count"),
}
MAX_NEW_TOKENS = {"vqa": 16, "choice": 16, "yesno": 16, "exact": 16, "caption": 64}


@dataclass(frozen=True)
class ItemScore:
    score: float  # vqa: soft accuracy; choice, yesno, exact: 0 or 1; caption: sentence chrF++
    parsed: str | None = None  # choice: the letter read from the prediction (None: unparsed); yesno: "yes"/"no"


@dataclass
class Scored:
    """The scores of one model's predictions on one eval set."""

    items: list[ItemScore]
    overall: dict[str, float | int]
    categories: dict[str, dict[str, float | int]]  # sorted by name; empty when no item has a category


def score_item(task: str, item: EvalItem, prediction: str) -> ItemScore:
    """One prediction's score under ``task`` (captions: see :func:`score`, which scores them as a corpus)."""
    if task == "vqa":
        return ItemScore(vqa_accuracy(prediction, item.references))
    if task == "choice":
        letter = choice_letter(prediction, item.options or {})
        return ItemScore(float(letter == item.answer), letter)
    if task == "yesno":
        said = pope_answer(prediction)
        return ItemScore(float(said == item.answer), said)
    if task == "exact":
        return ItemScore(exact_match(prediction, item.references))
    raise ValueError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")


def summarise(task: str, items: Sequence[EvalItem], predictions: Sequence[str], scores: Sequence[ItemScore]) -> dict:
    """One group's metrics (the names of ``METRICS[task]``)."""
    count = {"count": len(items)}
    if task in ("vqa", "exact"):
        return {"accuracy": fmean(s.score for s in scores), **count}
    if task == "choice":
        unparsed = sum(s.parsed is None for s in scores)
        return {"accuracy": fmean(s.score for s in scores), "unparsed": unparsed, **count}
    if task == "yesno":
        metrics = yesno_metrics([s.parsed or "" for s in scores], [item.answer for item in items])
        return {**metrics, **count}
    corpus, _ = caption_metrics(predictions, [item.references for item in items])
    return {**corpus, **count}


def score(task: str, items: Sequence[EvalItem], predictions: Sequence[str]) -> Scored:
    """Every item's score, the metrics over all items and per category."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
    if len(items) != len(predictions):
        raise ValueError(f"{len(predictions)} predictions for {len(items)} items")
    if task == "caption":
        _, sentence = caption_metrics(predictions, [item.references for item in items])
        scores = [ItemScore(s) for s in sentence]
    else:
        scores = [score_item(task, item, p) for item, p in zip(items, predictions, strict=True)]
    groups: dict[str, list[int]] = {}
    for index, item in enumerate(items):
        if item.category is not None:
            groups.setdefault(item.category, []).append(index)

    def group(indices: Sequence[int]) -> dict[str, float | int]:
        picked = [items[i] for i in indices], [predictions[i] for i in indices], [scores[i] for i in indices]
        return summarise(task, *picked)

    categories = {name: group(groups[name]) for name in sorted(groups)}
    return Scored(scores, group(range(len(items))), categories)
