"""What ``skipvision eval`` writes: predictions.jsonl, metrics.json and metrics.md (docs/evaluation.md "Outputs").

An output folder that already holds files is refused before any model loads, unless the caller allows overwriting,
which replaces only these three files. Each file is written under a temporary name and renamed, so an interrupted
write never leaves half a file under the final name.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from skipvision.atomic import write_text_atomic
from skipvision.errors import OutputExistsError
from skipvision.eval.scoring import METRICS

if TYPE_CHECKING:  # the runner imports torch
    from skipvision.eval.data import EvalItem
    from skipvision.eval.runner import ModelResult

OUTPUT_FILES = ("predictions.jsonl", "metrics.json", "metrics.md")
COUNTS = ("count", "unparsed")  # integer metrics; every other metric is a fraction, shown in % in the table


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse an ``out`` that is a file, or a folder with files in it unless ``overwrite``."""
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"--out {out} is a file; give a folder")
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if held and not overwrite:
        shown = ", ".join(held[:3]) + (", ..." if len(held) > 3 else "")
        raise OutputExistsError(
            f"{out} already holds files ({shown}); give a new --out, or --overwrite to replace "
            f"{', '.join(OUTPUT_FILES)} there"
        )


def prediction_rows(task: str, items: Sequence[EvalItem], results: Sequence[ModelResult]) -> Iterator[dict[str, Any]]:
    """One row per model and item: what was asked, answered and expected, and the item's score."""
    for result in results:
        for item, prediction, scored in zip(items, result.predictions, result.scored.items, strict=True):
            row: dict[str, Any] = {
                "model": result.model.name,
                "id": item.id,
                "category": item.category,
                "question": item.question,
                "prediction": prediction,
                "answer": item.answer,
            }
            if item.answers:
                row["answers"] = list(item.answers)
            if task in ("choice", "yesno"):
                row["parsed"] = scored.parsed
            yield {**row, "score": scored.score}


def metrics_document(
    task: str, data: str, items: Sequence[EvalItem], results: Sequence[ModelResult], settings: Mapping[str, Any]
) -> dict[str, Any]:
    """metrics.json: the task, the data, the generation settings and, per model, its metrics and throughput."""
    return {
        "task": task,
        "data": data,
        "items": len(items),
        "settings": dict(settings),
        "models": {
            r.model.name: {
                "checkpoint": r.model.checkpoint,
                "policy": r.model.policy,
                "seconds": r.seconds,
                "samples_per_s": r.samples_per_s,
                "overall": r.scored.overall,
                "categories": r.scored.categories,
            }
            for r in results
        },
    }


def markdown_table(task: str, results: Sequence[ModelResult]) -> str:
    """metrics.md: per category ("overall" first) its item count and one row per metric, one column per model;
    fractions in %. Every model answers the same items, so the count is a column of its own, not a metric row."""
    names = [r.model.name for r in results]
    lines = ["| category | items | metric | " + " | ".join(names) + " |", "|---|---:|---|" + "---:|" * len(names)]
    categories = ["overall", *results[0].scored.categories]
    for category in categories:
        groups = [r.scored.overall if category == "overall" else r.scored.categories[category] for r in results]
        for metric in METRICS[task]:
            if metric == "count":
                continue
            cells = [_cell(metric, group[metric]) for group in groups]
            lines.append(f"| {category} | {groups[0]['count']} | {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(metric: str, value: float | int) -> str:
    return str(value) if metric in COUNTS else f"{100 * value:.2f}"


def write_outputs(
    out: Path,
    task: str,
    data: str,
    items: Sequence[EvalItem],
    results: Sequence[ModelResult],
    settings: Mapping[str, Any],
) -> str:
    """Write the three files into ``out`` (created if needed); returns the Markdown table."""
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(task, results)
    rows = "".join(json.dumps(row) + "\n" for row in prediction_rows(task, items, results))
    document = json.dumps(metrics_document(task, data, items, results, settings), indent=2) + "\n"
    for name, text in zip(OUTPUT_FILES, (rows, document, table), strict=True):
        write_text_atomic(out / name, text)
    return table
