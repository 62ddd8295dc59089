"""``python -m skipvision eval`` on a tiny trained run and a tiny HF LLaVA folder (docs/evaluation.md): its answers
are ``VLMGenerator.generate``'s on the same prompts, its metrics per category those counted by hand on hand-written
answers, its files what the docs say; eval sets are read from JSONL or shards; every user error is one line with
exit status 2, raised before any model loads."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path
from statistics import fmean

import pytest
import torch

from skipvision.cli import main
from skipvision.data.tokenizer import load_tokenizer
from skipvision.eval import runner
from skipvision.eval.metrics import vqa_accuracy
from skipvision.inference import GenerationConfig, Request, VLMGenerator

from .processes import REPO, process_env, run_cli
from .test_llava_import import clip_processor, tiny_llava

INSTRUCTION = "Answer with one word."


def shard_samples(root: Path) -> list[dict]:
    """The val samples of a shapes set: key, json and png bytes, in shard order."""
    samples = []
    for shard in sorted((root / "val").glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name in sorted(n for n in members if n.endswith(".json")):
            key = name.removesuffix(".json")
            samples.append({"key": key, "json": json.loads(members[name]), "png": members[f"{key}.png"]})
    return samples


@pytest.fixture(scope="module")
def eval_dir(tiny_shapes: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny shapes val set as JSONL eval sets (images as files next to them): ``vqa.jsonl`` with the VQAv2 field
    ``answers`` on every other item, ``yesno.jsonl`` (the yes/no questions), ``choice.jsonl`` (options from the
    colours)."""
    folder = tmp_path_factory.mktemp("evalset")
    (folder / "images").mkdir()
    vqa, yesno, choice = [], [], []
    for sample in shard_samples(tiny_shapes)[:12]:
        (folder / "images" / f"{sample['key']}.png").write_bytes(sample["png"])
        turns = sample["json"]["conversations"]
        question = turns[-2]["value"].replace("<image>\n", "")
        answer, qtype = turns[-1]["value"], sample["json"]["qtype"]
        item = {"id": sample["key"], "image": f"images/{sample['key']}.png", "question": question, "answer": answer}
        vqa.append({**item, "category": qtype, **({"answers": [answer] * 3 + ["x"] * 7} if len(vqa) % 2 else {})})
        if answer in ("yes", "no"):
            yesno.append({**item, "category": qtype})
        choice.append({**item, "choices": ["red", "green", "blue", answer] if qtype != "colour" else ["red", "blue"]})
    choice = [c for c in choice if c["answer"] in c["choices"]]
    for name, rows in (("vqa", vqa), ("yesno", yesno), ("choice", choice)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def generated(checkpoint: Path, prompts: list[tuple[str, Path | None]], tokens: int, batch: int, **skip) -> list[str]:
    """What the Python API answers to (prompt, image) pairs, greedy."""
    generator = VLMGenerator.from_checkpoint(checkpoint, **skip)
    requests = [Request(prompt, image) for prompt, image in prompts]
    return [g.text for g in generator.generate(requests, GenerationConfig(max_new_tokens=tokens), batch)]


def test_cli_answers_equal_generate_and_metrics_equal_the_vqa_metric(
    tiny_skip_run: Path, eval_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    args = ["eval", "--checkpoint", str(tiny_skip_run), "--data", str(eval_dir / "vqa.jsonl"), "--task", "vqa"]
    log = run_cli(
        [*args, "--out", str(out), "--batch-size", "3", "--max-new-tokens", "4", "--instruction", INSTRUCTION],
        tmp_path / "eval.log",
        timeout_s=300,
    )
    items = rows_of(eval_dir / "vqa.jsonl")
    rows = rows_of(out / "predictions.jsonl")
    prompts = [(f"{i['question']}\n{INSTRUCTION}", eval_dir / i["image"]) for i in items]
    assert [r["prediction"] for r in rows] == generated(tiny_skip_run, prompts, tokens=4, batch=3)
    assert [(r["model"], r["id"], r["question"], r["answer"]) for r in rows] == [
        ("run", i["id"], i["question"], i["answer"]) for i in items
    ]
    assert [r.get("answers") for r in rows] == [i.get("answers") for i in items]
    scores = [vqa_accuracy(r["prediction"], i.get("answers", [i["answer"]])) for r, i in zip(rows, items, strict=True)]
    assert [r["score"] for r in rows] == scores

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "vqa" and metrics["items"] == len(items)
    assert metrics["settings"]["max_new_tokens"] == 4 and metrics["settings"]["instruction"] == INSTRUCTION
    model = metrics["models"]["run"]
    assert model["checkpoint"] == str(tiny_skip_run) and model["samples_per_s"] > 0
    assert model["overall"] == {"accuracy": pytest.approx(fmean(scores)), "count": len(items)}
    for category in {i["category"] for i in items}:
        mine = [s for s, i in zip(scores, items, strict=True) if i["category"] == category]
        assert model["categories"][category] == {"accuracy": pytest.approx(fmean(mine)), "count": len(mine)}

    table = (out / "metrics.md").read_text()
    assert table.startswith("| category | items | metric | run |\n|---|---:|---|---:|\n")
    assert f"| overall | {len(items)} | accuracy | {100 * fmean(scores):.2f} |\n" in table
    assert table in log  # printed at the end
    assert f"run: {len(items)} samples in" in log and "samples/s" in log


def test_a_data_folder_is_read_from_its_val_shards(tiny_skip_run: Path, tiny_shapes: Path, tmp_path: Path) -> None:
    """The question is the last human turn, the answer the last gpt turn, the category the json's qtype."""
    out = tmp_path / "out"
    argv = ["eval", "--checkpoint", str(tiny_skip_run), "--data", str(tiny_shapes), "--task", "exact"]
    assert main([*argv, "--out", str(out), "--limit", "10", "--batch-size", "4", "--no-progress"]) == 0
    samples = shard_samples(tiny_shapes)[:10]
    rows = rows_of(out / "predictions.jsonl")
    assert [(r["id"], r["question"], r["answer"], r["category"]) for r in rows] == [
        (s["key"], s["json"]["conversations"][-2]["value"], s["json"]["conversations"][-1]["value"], s["json"]["qtype"])
        for s in samples
    ]
    images = []
    for s in samples:
        images.append(tmp_path / f"{s['key']}.png")
        images[-1].write_bytes(s["png"])
    prompts = [(r["question"], image) for r, image in zip(rows, images, strict=True)]
    assert [r["prediction"] for r in rows] == generated(tiny_skip_run, prompts, tokens=16, batch=4)
    assert json.loads((out / "metrics.json").read_text())["settings"]["max_new_tokens"] == 16  # the task's default


YESNO = [  # id, category, answer, the model's answer: what POPE reads in it
    ("r1", "random", "yes", "Yes, there is a dog."),  # yes: TP
    ("r2", "random", "no", "No."),  # no: TN
    ("r3", "random", "no", "There is a dog"),  # yes: FP
    ("p1", "popular", "yes", "There is no dog."),  # no: FN
    ("p2", "popular", "yes", "Yes. But no cat."),  # yes (only the text before the first period counts): TP
    ("p3", "popular", "no", "not at all"),  # no: TN
]
CHOICE = [  # id, category, choices, answer, the model's answer: the letter read
    ("c1", "animal", ["cat", "dog", "bird"], "dog", "B"),  # B: right
    ("c2", "colour", ["red", "green"], "A", "(B) green"),  # B: wrong
    ("c3", "animal", {"A": "two", "B": "three"}, "three", "It is three."),  # B, by its text: right
    ("c4", "colour", ["cat", "dog"], "A", "A or B"),  # two letters: unparsed
    ("c5", "animal", ["sun", "moon"], "moon", "I do not know"),  # unparsed
]


def test_the_cli_aggregates_yesno_and_choice_answers_per_category_as_computed_by_hand(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The CLI's scoring and report path on hand-written answers (the model is replaced: the metric functions have
    their own tests in tests/test_eval_metrics.py): overall and per-category metrics, counted by hand."""
    answers = {rid: said for rid, *_, said in YESNO + CHOICE}
    monkeypatch.setattr(runner.VLMGenerator, "from_checkpoint", lambda *args: None)

    def predict(generator, items, config, batch_size, instruction, advance) -> list[str]:
        advance(len(items))
        return [answers[item.id] for item in items]

    monkeypatch.setattr(runner, "predict", predict)
    (tmp_path / "model").mkdir()
    base = ["eval", "--checkpoint", str(tmp_path / "model"), "--no-progress"]

    yesno = tmp_path / "yesno.jsonl"
    yesno.write_text(
        "".join(json.dumps({"id": i, "category": c, "question": "Dog?", "answer": a}) + "\n" for i, c, a, _ in YESNO)
    )
    assert main([*base, "--data", str(yesno), "--task", "yesno", "--out", str(tmp_path / "y")]) == 0
    rows = rows_of(tmp_path / "y" / "predictions.jsonl")
    assert [(r["id"], r["parsed"], r["score"]) for r in rows] == [
        ("r1", "yes", 1.0),
        ("r2", "no", 1.0),
        ("r3", "yes", 0.0),
        ("p1", "no", 0.0),
        ("p2", "yes", 1.0),
        ("p3", "no", 1.0),
    ]
    model = json.loads((tmp_path / "y" / "metrics.json").read_text())["models"]["model"]
    third, two_thirds = pytest.approx(1 / 3), pytest.approx(2 / 3)
    assert model["overall"] == {
        "accuracy": two_thirds,
        "precision": two_thirds,
        "recall": two_thirds,
        "f1": two_thirds,
        "yes_ratio": 0.5,
        "tp": 2,
        "fp": 1,
        "tn": 2,
        "fn": 1,
        "count": 6,
    }
    assert model["categories"] == {
        "popular": {
            "accuracy": two_thirds,
            "precision": 1.0,
            "recall": 0.5,
            "f1": two_thirds,
            "yes_ratio": third,
            "tp": 1,
            "fp": 0,
            "tn": 1,
            "fn": 1,
            "count": 3,
        },
        "random": {
            "accuracy": two_thirds,
            "precision": 0.5,
            "recall": 1.0,
            "f1": two_thirds,
            "yes_ratio": two_thirds,
            "tp": 1,
            "fp": 1,
            "tn": 1,
            "fn": 0,
            "count": 3,
        },
    }
    table = (tmp_path / "y" / "metrics.md").read_text()
    for line in (
        "| overall | 6 | yes_ratio | 50.00 |",
        "| popular | 3 | precision | 100.00 |",
        "| random | 3 | recall | 100.00 |",
        "| random | 3 | yes_ratio | 66.67 |",
    ):
        assert line + "\n" in table
    assert table in capsys.readouterr().out

    choice = tmp_path / "choice.jsonl"
    choice.write_text(
        "".join(
            json.dumps({"id": i, "category": c, "question": "Which?", "choices": o, "answer": a}) + "\n"
            for i, c, o, a, _ in CHOICE
        )
    )
    assert main([*base, "--data", str(choice), "--task", "choice", "--out", str(tmp_path / "c")]) == 0
    rows = rows_of(tmp_path / "c" / "predictions.jsonl")
    assert [(r["answer"], r["parsed"], r["score"]) for r in rows] == [
        ("B", "B", 1.0),
        ("A", "B", 0.0),
        ("B", "B", 1.0),
        ("A", None, 0.0),
        ("B", None, 0.0),
    ]
    model = json.loads((tmp_path / "c" / "metrics.json").read_text())["models"]["model"]
    assert model["overall"] == {"accuracy": pytest.approx(0.4), "unparsed": 2, "count": 5}
    assert model["categories"] == {
        "animal": {"accuracy": two_thirds, "unparsed": 1, "count": 3},
        "colour": {"accuracy": 0.0, "unparsed": 1, "count": 2},
    }
    table = (tmp_path / "c" / "metrics.md").read_text()
    assert "| overall | 5 | accuracy | 40.00 |\n| overall | 5 | unparsed | 2 |\n" in table
    assert "| animal | 3 | accuracy | 66.67 |\n| animal | 3 | unparsed | 1 |\n" in table
    assert "| colour | 2 | accuracy | 0.00 |\n| colour | 2 | unparsed | 1 |\n" in table


def test_a_request_with_its_own_system_prompt_is_rendered_with_it(tiny_skip_run: Path) -> None:
    """A shard sample's system turn reaches the prompt (tests/test_eval_data.py: it becomes the request's)."""
    generator = VLMGenerator.from_checkpoint(tiny_skip_run)
    [own, default] = generator.encode([Request("What colour?", system="Be brief."), Request("What colour?")])
    assert "Be brief." in generator.tokenizer.decode(own.ids)
    assert "Be brief." not in generator.tokenizer.decode(default.ids)


@pytest.fixture(scope="module")
def llava_folder(tiny_shapes: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny HF LLaVA folder whose matrices are drawn with std 0.2: at the default initialisation it answers the
    same to every prompt, here its answers depend on the prompt and the image, and FastV changes some of them."""
    folder = tmp_path_factory.mktemp("llava")
    tokenizer = load_tokenizer(tiny_shapes / "tokenizer")
    model = tiny_llava(tokenizer)
    torch.manual_seed(0)
    with torch.no_grad():
        for weight in (p for p in model.parameters() if p.dim() > 1):
            weight.normal_(0, 0.2)
    model.save_pretrained(folder)
    clip_processor().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_compare_runs_policies_and_runs_side_by_side_on_the_same_prompts(
    llava_folder: Path, tiny_skip_run: Path, eval_dir: Path, tmp_path: Path
) -> None:
    """Methods by name on one HF LLaVA folder, next to a trained run: one column each, each model's answers its own
    generator's."""
    fastv = {"name": "fastv", "layer": 1, "ratio": 0.5}
    compare = ["full={name: none}", "fastv={name: fastv, layer: 1, ratio: 0.5}", f"trained={tiny_skip_run}"]
    argv = ["eval", "--checkpoint", str(llava_folder), "--data", str(eval_dir / "vqa.jsonl"), "--task", "vqa"]
    assert (
        main([*argv, "--out", str(tmp_path / "out"), "--limit", "5", "--max-new-tokens", "3", "--compare", *compare])
        == 0
    )
    rows = rows_of(tmp_path / "out" / "predictions.jsonl")
    items = rows_of(eval_dir / "vqa.jsonl")[:5]
    prompts = [(i["question"], eval_dir / i["image"]) for i in items]
    by_model = {name: [r["prediction"] for r in rows if r["model"] == name] for name in ("full", "fastv", "trained")}
    assert by_model["full"] == generated(llava_folder, prompts, tokens=3, batch=8, skip={"policy": {"name": "none"}})
    assert by_model["fastv"] == generated(llava_folder, prompts, tokens=3, batch=8, skip={"policy": fastv})
    assert len(set(by_model["full"])) > 1 and by_model["fastv"] != by_model["full"]  # answers that tell apart
    assert by_model["trained"] == generated(tiny_skip_run, prompts, tokens=3, batch=8)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert list(metrics["models"]) == ["full", "fastv", "trained"] and metrics["models"]["fastv"]["policy"] == fastv
    header = "| category | items | metric | full | fastv | trained |"
    assert (tmp_path / "out" / "metrics.md").read_text().startswith(header)


def _error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err.removeprefix("skipvision eval: error: ").removesuffix("\n")


def test_an_eval_set_without_answers_fails_in_one_line_through_the_cli(
    tiny_skip_run: Path, eval_dir: Path, tmp_path: Path
) -> None:
    data = tmp_path / "set.jsonl"
    good = rows_of(eval_dir / "vqa.jsonl")[0]
    good["image"] = str(eval_dir / good["image"])
    data.write_text(json.dumps(good) + "\n" + json.dumps({"question": "What colour?", "image": None}) + "\n")
    argv = [
        "eval",
        "--checkpoint",
        str(tiny_skip_run),
        "--data",
        str(data),
        "--task",
        "vqa",
        "--out",
        str(tmp_path / "o"),
    ]
    done = subprocess.run(
        [sys.executable, "-m", "skipvision", *argv],
        env=process_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr == (
        f'skipvision eval: error: {data}:2: no answer (give "answer", a non-empty string, or "answers", a list)\n'
    )
    assert not (tmp_path / "o").exists()


def test_user_errors_are_one_line_before_any_model_loads(
    tiny_skip_run: Path, eval_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run, vqa = str(tiny_skip_run), str(eval_dir / "vqa.jsonl")
    out = str(tmp_path / "out")

    def fails(*argv: str) -> str:
        assert main(["eval", *argv]) == 2
        return _error(capsys)

    assert fails("--checkpoint", run, "--data", vqa, "--task", "vqa2", "--out", out) == (
        "unknown task 'vqa2'; tasks: vqa, choice, yesno, exact, caption"
    )
    missing = tmp_path / "nowhere.jsonl"
    assert fails("--checkpoint", run, "--data", str(missing), "--task", "vqa", "--out", out) == (
        f"no eval set at {missing} (give a JSONL file, a data folder or shards)"
    )
    assert fails("--checkpoint", str(tmp_path / "norun"), "--data", vqa, "--task", "vqa", "--out", out) == (
        f"model norun: no checkpoint at {tmp_path / 'norun'}"
    )
    assert "expected NAME=PATH" in fails("--data", vqa, "--task", "vqa", "--out", out, "--compare", run)
    assert fails("--data", vqa, "--task", "vqa", "--out", out, "--compare", f"a={run}", f"a={run}") == (
        "--compare: the name 'a' is given twice"
    )
    assert fails("--checkpoint", run, "--data", vqa, "--task", "vqa", "--out", out, "--compare", "f={name: fastv}") == (
        f"model f: a skip policy runs on an HF LLaVA folder; {run} is not one (a training run or an export has its "
        "own skip settings)"
    )
    assert "--compare f: not valid YAML" in fails(
        "--checkpoint", run, "--data", vqa, "--task", "vqa", "--out", out, "--compare", "f={name: fastv"
    )

    yesno = tmp_path / "bad-yesno.jsonl"
    yesno.write_text(json.dumps({"question": "Is it red?", "answer": "maybe"}) + "\n")
    assert fails("--checkpoint", run, "--data", str(yesno), "--task", "yesno", "--out", out) == (
        f'{yesno}:1: task yesno needs the answer "yes" or "no", got \'maybe\''
    )
    choice = tmp_path / "bad-choice.jsonl"
    choice.write_text(json.dumps({"question": "Which?", "answer": "E", "choices": ["cat", "dog"]}) + "\n")
    assert fails("--checkpoint", run, "--data", str(choice), "--task", "choice", "--out", out) == (
        f"{choice}:1: the answer 'E' is neither an option letter nor one option's text"
    )
    no_image = tmp_path / "no-image.jsonl"
    no_image.write_text(json.dumps({"question": "<image> Which?", "answer": "red", "image": "gone.png"}) + "\n")
    assert fails("--checkpoint", run, "--data", str(no_image), "--task", "exact", "--out", out) == (
        f"{no_image}:1: no image at {tmp_path / 'gone.png'}"
    )
    assert not Path(out).exists()


def test_an_output_folder_with_files_is_refused_unless_overwrite(
    tiny_skip_run: Path, eval_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "metrics.json").write_text("an earlier result")
    argv = ["eval", "--checkpoint", str(tiny_skip_run), "--data", str(eval_dir / "vqa.jsonl"), "--task", "exact"]
    argv += ["--out", str(out), "--limit", "2", "--max-new-tokens", "2", "--no-progress"]
    assert main(argv) == 2
    assert _error(capsys) == (
        f"{out} already holds files (metrics.json, notes.txt); give a new --out, or --overwrite to replace "
        "predictions.jsonl, metrics.json, metrics.md there"
    )
    assert (out / "metrics.json").read_text() == "an earlier result"
    assert main([*argv, "--overwrite"]) == 0
    assert json.loads((out / "metrics.json").read_text())["items"] == 2
    assert (out / "notes.txt").read_text() == "mine"  # only the three result files are replaced
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "metrics.md", "notes.txt", "predictions.jsonl"]
