"""The whole real-format path a new user follows (README "Real data: convert, fit, evaluate"): the LLaVA-format
fixture -> ``skipvision data llava`` -> ``skipvision fit`` on the converted shards -> ``skipvision eval``, each through
the real CLI in a child process with a deadline."""

from __future__ import annotations

import csv
import json
import runpy
from collections import Counter
from pathlib import Path
from statistics import fmean

from skipvision.eval.metrics import exact_match

from .conftest import TINY_RECIPE
from .processes import REPO, run_cli

SCRIPT = runpy.run_path(str(REPO / "scripts" / "make_llava_fixture.py"))
NUM_RECORDS = 48
IMAGE_SLOTS = 16  # the tiny recipe's full model: a 32 px image in 8 px patches
MAX_LENGTH = 256  # the tiny backbone's context


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_convert_fit_eval_on_llava_format_data(tmp_path: Path) -> None:
    fixture = SCRIPT["make_fixture"](tmp_path / "fixture", num=NUM_RECORDS)
    shards, run, results = tmp_path / "shards", tmp_path / "run", tmp_path / "eval"
    tokenizer = str(fixture["tokenizer"])

    convert = ["data", "llava", "--json", str(fixture["json"]), "--images", str(fixture["images"])]
    limits = ["--tokenizer", tokenizer, "--max-tokens", str(MAX_LENGTH), "--image-tokens", str(IMAGE_SLOTS)]
    run_cli(
        [*convert, "--out", str(shards), "--val-fraction", "0.1", *limits, "--workers", "1"],
        tmp_path / "convert.log",
        timeout_s=180,
    )
    meta = json.loads((shards / "meta.json").read_text())
    rejected = rows_of(shards / "rejected.jsonl")
    assert meta["num_train"] + meta["num_val"] + len(rejected) == NUM_RECORDS
    assert {r["id"] for r in rejected} >= set(SCRIPT["BAD"])  # every deliberately bad record, with its reason
    assert all(SCRIPT["BAD"][r["id"]] == r["reason"] for r in rejected if r["id"] in SCRIPT["BAD"])

    # The converted folder is a data root as it is: train/ and val/ shards, the tokenizer given separately. Every
    # sample fits data.max_length (the converter counted the same tokens), so training skips none.
    data = [f"data.root={shards}", f"data.tokenizer={tokenizer}", "data.shapes.generate=false"]
    data += [f"data.max_length={MAX_LENGTH}", "data.group_by_modality_length=true", "data.on_error=raise"]
    run_args = ["trainer.max_steps=3", "trainer.limit_val_batches=null", f"output_dir={run}"]
    log = run_cli(
        ["fit", "--recipe", str(TINY_RECIPE), *data, *run_args],
        tmp_path / "fit.log",
        timeout_s=300,
    )
    assert "done: 3 steps" in log
    logged = [row for row in csv.DictReader((run / "logs" / "version_0" / "metrics.csv").open()) if row["val/loss"]]
    assert [row["step"] for row in logged] == ["2"]  # validated once, at the end, on the converted val shard

    questions = rows_of(fixture["eval"])
    run_cli(
        ["eval", "--checkpoint", str(run), "--data", str(fixture["eval"]), "--task", "exact", "--out", str(results)],
        tmp_path / "eval.log",
        timeout_s=180,
    )
    answers = rows_of(results / "predictions.jsonl")
    assert [(a["id"], a["question"], a["answer"]) for a in answers] == [
        (q["id"], q["question"], q["answer"]) for q in questions
    ]
    scores = [exact_match(a["prediction"], [a["answer"]]) for a in answers]
    assert [a["score"] for a in answers] == scores
    model = json.loads((results / "metrics.json").read_text())["models"]["run"]
    assert model["overall"] == {"accuracy": fmean(scores), "count": len(questions)}
    counts = Counter(q["category"] for q in questions)
    assert {name: c["count"] for name, c in model["categories"].items()} == dict(counts)
