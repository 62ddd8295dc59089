"""The README's Results table, produced from the current code: fit the default recipe (Skip-Vision) and its full-model
twin one after the other, then tabulate the final held-out accuracy per question type, the validation loss and the
wall time, and write the table between the README's results markers.

    bash scripts/venv-run python scripts/results.py [--write-readme] [key=value ...]

Overrides apply to both recipes (e.g. ``trainer.max_steps=100`` for a quick look). The runs go to
``runs/results-<recipe>`` and replace what an earlier call left there.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import webdataset as wds

REPO = Path(__file__).resolve().parent.parent
RECIPES = {"Skip-Vision (default)": "shapes-tiny", "full model": "shapes-tiny-full"}
QUESTIONS = {
    "colour": ('"What colour is the circle?"', "16.7%"),
    "shape": ('"What shape is the red object?"', "33.3%"),
    "count": ('"How many squares are there?"', ""),
    "existence": ('"Is there a blue circle?"', "50%"),
    "position": ('"Is the red circle left of the blue square?"', "50%"),
}
START, END = "<!-- results:start -->", "<!-- results:end -->"


def fit(recipe: str, overrides: list[str]) -> tuple[dict[str, float], float]:
    """Train one recipe into a fresh folder; its last validation metrics and the wall time in seconds."""
    run = REPO / "runs" / f"results-{recipe}"
    args = [f"output_dir={run}", "checkpoint.overwrite=true", *overrides]
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "skipvision", "fit", "--recipe", recipe, *args], check=True, cwd=REPO)
    seconds = time.perf_counter() - start
    versions = sorted((run / "logs").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    rows = list(csv.DictReader(open(versions[-1] / "metrics.csv")))
    last = [r for r in rows if r.get("val/acc_all")][-1]
    return {k: float(v) for k, v in last.items() if k.startswith("val/") and v}, seconds


def question_counts(data_root: Path) -> Counter[str]:
    """Validation questions per type, read from the validation shards."""
    shards = sorted(str(p) for p in (data_root / "val").glob("*.tar"))
    pipeline = wds.DataPipeline(wds.SimpleShardList(shards), wds.tarfile_to_samples())
    return Counter(json.loads(sample["json"]).get("qtype", "all") for sample in pipeline)


def table(results: dict[str, tuple[dict[str, float], float]], counts: Counter[str], command: str) -> str:
    names = list(results)
    lines = [
        f"| question type | samples | {' | '.join(names)} | chance |",
        "|---|---|" + "---|" * len(names) + "---|",
    ]
    for qtype, (example, chance) in QUESTIONS.items():
        cells = [f"{100 * results[n][0][f'val/acc_{qtype}']:.1f}%" for n in names]
        lines.append(f"| {qtype} ({example}) | {counts[qtype]} | {' | '.join(cells)} | {chance} |")
    lines.append(
        f"| all | {sum(counts.values())} | "
        + " | ".join(f"{100 * results[n][0]['val/acc_all']:.1f}%" for n in names)
        + " | |"
    )
    lines.append(
        "| validation loss (answer tokens) | | "
        + " | ".join(f"{results[n][0]['val/loss']:.3f}" for n in names)
        + " | |"
    )
    lines.append(
        "| wall time, incl. data generation the first time | | "
        + " | ".join(_minutes(results[n][1]) for n in names)
        + " | |"
    )
    return "\n".join([f"Produced by `{command}` ({time.strftime('%Y-%m-%d')}, 2 CPU cores):", "", *lines])


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {int(seconds % 60)} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write-readme", action="store_true", help="replace the table between the README markers")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    results = {name: fit(recipe, args.overrides) for name, recipe in RECIPES.items()}
    command = " ".join(["bash scripts/venv-run python scripts/results.py", *args.overrides])
    text = table(results, question_counts(REPO / "data" / "shapes"), command)
    print(text)
    if args.write_readme:
        readme = REPO / "README.md"
        body = readme.read_text()
        if START not in body or END not in body:
            raise SystemExit(f"README.md has no {START} ... {END} markers")
        readme.write_text(re.sub(f"{re.escape(START)}.*?{re.escape(END)}", f"{START}\n{text}\n{END}", body, flags=re.S))


if __name__ == "__main__":
    main()
