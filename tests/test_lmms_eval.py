"""The lmms-eval model ``skipvision`` against the real lmms-eval (docs/evaluation.md "lmms-eval"), offline: the
pinned extra's own venv (scripts/venv-run --extra lmms-eval, which CI builds before the tests), the model found
through the ``lmms_eval.models`` entry point as a pip-installed skipvision declares it, a local task over local
files, and the answers and the metric compared with ``skipvision eval`` on the same eval set; and the model's
``--model_args`` as lmms-eval parses them (a policy spec with commas, booleans, several processes refused)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from skipvision.data.tokenizer import load_tokenizer
from skipvision.eval import ModelSpec, read_eval_set, run_eval
from skipvision.eval.metrics import exact_match

from .processes import REPO, TESTS, process_env, run_all, run_cli
from .test_llava_import import clip_processor, tiny_llava

TASK = TESTS / "lmms_tasks" / "skipvision_exact"
EXTRA = ["bash", str(REPO / "scripts" / "venv-run"), "--extra", "lmms-eval"]


@pytest.fixture(scope="module")
def task_folder(tiny_shapes: Path, tiny_skip_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The task definition beside its data: the tiny validation set as a ``skipvision eval`` JSONL with PNG files.

    A 2-step model answers nothing right, so every other item's answer is the model's own answer: the accuracy is
    then about half, and comparing it with lmms-eval's tests the scoring, not only that both are 0."""
    folder = tmp_path_factory.mktemp("task") / "skipvision_exact"
    shutil.copytree(TASK, folder, ignore=shutil.ignore_patterns("__pycache__"))
    items = read_eval_set(tiny_shapes, "exact")
    [result] = run_eval([ModelSpec("run", str(tiny_skip_run))], items, "exact", batch_size=4, progress=False)
    rows = []
    for index, (item, said) in enumerate(zip(items, result.predictions, strict=True)):
        assert isinstance(item.image, bytes) and said.strip()
        (folder / f"{item.id}.png").write_bytes(item.image)
        answer = said if index % 2 == 0 else item.answer
        rows.append({"id": item.id, "question": item.question, "answer": answer, "image": f"{item.id}.png"})
    (folder / "eval.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def test_lmms_eval_answers_and_scores_as_skipvision_eval(
    tiny_skip_run: Path, task_folder: Path, tmp_path: Path
) -> None:
    # Both commands run as child processes in the same environment (offline, one thread each), so nothing but the
    # harness differs between them.
    offline = {"HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "datasets")}
    data = ["--data", str(task_folder / "eval.jsonl"), "--task", "exact", "--batch-size", "4", "--no-progress"]
    args = ["eval", "--checkpoint", str(tiny_skip_run), *data, "--out", str(tmp_path / "eval")]
    run_cli(args, tmp_path / "eval.log", 300, **offline)
    ours = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    [ours_metrics] = json.loads((tmp_path / "eval" / "metrics.json").read_text())["models"].values()
    assert 0 < ours_metrics["overall"]["accuracy"] < 1

    # Building the extra's venv (minutes, once per lock) has its own deadline, so lmms-eval's does not include it.
    run_all([[*EXTRA, "true"]], [tmp_path / "venv.log"], 1200, process_env(**offline))
    model = ["--model", "skipvision", "--model_args", f"checkpoint={tiny_skip_run},device=cpu", "--batch_size", "4"]
    task = ["--tasks", "skipvision_exact", "--include_path", str(task_folder)]
    out = ["--output_path", str(tmp_path / "lmms"), "--log_samples"]
    run_all([[*EXTRA, "lmms-eval", *model, *task, *out]], [tmp_path / "lmms.log"], 300, process_env(**offline))

    [samples_file] = (tmp_path / "lmms").rglob("*_samples_skipvision_exact.jsonl")
    samples = sorted((json.loads(line) for line in samples_file.read_text().splitlines()), key=lambda s: s["doc_id"])
    # The model's text is "resps", logged only where it differs from the scored "filtered_resps" (stripped).
    answers = [s.get("resps", s["filtered_resps"]) for s in samples]
    assert [s["input"] for s in samples] == [row["question"] for row in ours]
    assert answers == [row["prediction"] for row in ours]

    [results_file] = (tmp_path / "lmms").rglob("*_results.json")
    reported = json.loads(results_file.read_text())["results"]["skipvision_exact"]["exact_match,none"]
    scores = [exact_match(a, [s["target"]]) for a, s in zip(answers, samples, strict=True)]
    assert reported == sum(scores) / len(scores) == ours_metrics["overall"]["accuracy"]


MODEL_ARGS = """
import json, os, sys
from skipvision.integrations.lmms_eval import LmmsEvalError, SkipVisionLMM, _boolean

folder = sys.argv[1]
# lmms-eval's own parser, as for --model_args: the spec's commas inside braces stay with it.
lm = SkipVisionLMM.create_from_arg_string(
    f"checkpoint={folder},policy={{name: fastv, layer: 1, ratio: 0.5}},drop_kv=false,dtype=float32",
    {"batch_size": 2, "device": "cpu"},
)
policy = lm.generator.model.visual.policy
out = {
    "spec": [lm.spec.checkpoint, lm.spec.policy],
    "loaded": [type(policy).__name__, policy.layer],
    "drop_kv": lm.drop_kv,
    "batch_size": lm.batch_size,
    "booleans": [_boolean("drop_kv", v) for v in (True, False, 1, 0, "TRUE", "false", "1", "0")],
    "errors": [],
}
for args in (f"checkpoint={folder},drop_kv=no", f"checkpoint={folder},drop_kv=off"):
    try:
        SkipVisionLMM.create_from_arg_string(args)
    except LmmsEvalError as err:
        out["errors"].append(str(err))
os.environ["WORLD_SIZE"] = "2"
try:
    SkipVisionLMM.create_from_arg_string(f"checkpoint={folder}")
except LmmsEvalError as err:
    out["errors"].append(str(err))
print("RESULT " + json.dumps(out))
"""


def test_model_args_as_lmms_eval_parses_them(tiny_shapes: Path, tmp_path: Path) -> None:
    """In the extra's venv, with lmms-eval's own ``--model_args`` parser: a policy spec with commas on an HF LLaVA
    folder, drop_kv=false taken as false and "no"/"off" refused (``bool("no")`` is True), several processes refused."""
    folder = tmp_path / "llava"
    tokenizer = load_tokenizer(tiny_shapes / "tokenizer")
    tiny_llava(tokenizer).save_pretrained(folder)
    clip_processor().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    run_all([[*EXTRA, "true"]], [tmp_path / "venv.log"], 1200, process_env())  # builds the venv if need be
    log = tmp_path / "args.log"
    run_all([[*EXTRA, "python", "-c", MODEL_ARGS, str(folder)]], [log], 300, process_env())
    [line] = [line for line in log.read_text().splitlines() if line.startswith("RESULT ")]
    out = json.loads(line.removeprefix("RESULT "))
    assert out["spec"] == [str(folder), {"name": "fastv", "layer": 1, "ratio": 0.5}]
    assert out["loaded"] == ["FastV", 1]
    assert (out["drop_kv"], out["batch_size"]) == (False, 2)
    assert out["booleans"] == [True, False, True, False, True, False, True, False]
    assert out["errors"] == [
        "model_args drop_kv=no: expected true or false (or 1 or 0)",
        "model_args drop_kv=off: expected true or false (or 1 or 0)",
        "2 processes (WORLD_SIZE): the skipvision model runs in one process, it does not take part in multi-process "
        "evaluation; run lmms-eval without accelerate launch or torchrun",
    ]
