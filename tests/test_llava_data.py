"""``skipvision data llava`` on the LLaVA-format fixture (scripts/make_llava_fixture.py): what it rejects and why,
shards the training loader reads back exactly, byte-identical output after an interruption, and
``data.group_by_modality_length`` (docs/data.md)."""

from __future__ import annotations

import io
import json
import os
import runpy
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import webdataset as wds
from PIL import Image

from skipvision.data.chat import encode_conversation
from skipvision.data.grouping import GroupByModalityLength
from skipvision.data.llava import ConvertSettings, Progress, convert_llava
from skipvision.data.llava_samples import KEPT_FORMATS, REASONS, LlavaInputError
from skipvision.data.pipeline import IMAGE_EXTENSIONS, SampleEncoder, build_pipeline
from skipvision.data.shapes import QUESTION_TYPES
from skipvision.data.tokenizer import IMAGE_TOKEN, load_tokenizer, prepare_tokenizer
from skipvision.data.views import image_transform
from skipvision.errors import MissingFileError, OutputExistsError
from skipvision.recipe import load_recipe

from .conftest import TINY_RECIPE
from .processes import REPO, process_env

SCRIPT = runpy.run_path(str(REPO / "scripts" / "make_llava_fixture.py"))
SETTINGS = ConvertSettings(val_fraction=0.1, shard_bytes=8000)
NUM = 48
NUM_VAL = 4  # round(0.1 * 42 accepted)
CLI_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def fixture(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return SCRIPT["make_fixture"](tmp_path_factory.mktemp("fixture"), num=NUM)


@pytest.fixture(scope="module")
def records(fixture: dict[str, Path]) -> dict[str, dict]:
    return {r["id"]: r for r in json.loads(fixture["json"].read_text())}


@pytest.fixture(scope="module")
def converted(fixture: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("converted") / "llava"
    convert_llava(fixture["json"], fixture["images"], out, SETTINGS)
    return out


@pytest.fixture(scope="module")
def tokenizer(fixture: dict[str, Path]):
    return prepare_tokenizer(load_tokenizer(fixture["tokenizer"]))


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _raw_samples(out: Path) -> dict[str, dict]:
    """Every sample of the converted set by original id: its json and its members' bytes (name order)."""
    meta = json.loads((out / "meta.json").read_text())
    samples = {}
    for shard in meta["train_shards"] + meta["val_shards"]:
        for sample in wds.WebDataset(str(out / shard), shardshuffle=False):
            info = json.loads(sample["json"])
            images = {k: v for k, v in sample.items() if k.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS}
            samples[info["id"]] = {"key": sample["__key__"], "json": info, "images": images}
    return samples


def _encoder(tokenizer, num_image_tokens: int = 3) -> SampleEncoder:
    transform = image_transform((64, 64), (0.0,) * 3, (1.0,) * 3)
    return SampleEncoder(tokenizer, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), num_image_tokens, transform, 4096)


def test_fixture_converts_with_exact_counts_and_rejections(converted: Path, records: dict[str, dict]) -> None:
    meta = json.loads((converted / "meta.json").read_text())
    expected_rejected = dict(sorted((reason, 1) for reason in SCRIPT["BAD"].values()))
    counts = {k: meta[k] for k in ("format", "num_records", "num_train", "num_val", "num_rejected", "rejected")}
    assert counts == {
        "format": "llava",
        "num_records": NUM,
        "num_train": NUM - 6 - NUM_VAL,
        "num_val": NUM_VAL,
        "num_rejected": 6,
        "rejected": expected_rejected,
    }
    # 33 plain samples, 3 without <image>, system, bmp, jpg: one image each; 2 + 12 in the multi-image samples.
    assert (meta["num_images"], meta["num_text_only"]) == (33 + 3 + 3 + 14, 1)
    assert meta["train_shards"] == [f"train/llava-train-{i:06d}.tar" for i in range(len(meta["train_shards"]))]
    assert len(meta["train_shards"]) >= 3 and meta["val_shards"] == ["val/llava-val-000000.tar"]
    assert set(os.listdir(converted)) == {"train", "val", "meta.json", "plan.json", "rejected.jsonl"}

    order = list(records)
    rejected = [json.loads(line) for line in (converted / "rejected.jsonl").read_text().splitlines()]
    assert [(r["id"], r["index"], r["reason"]) for r in rejected] == [
        (rid, order.index(rid), reason) for rid, reason in SCRIPT["BAD"].items()
    ]
    assert {r["reason"] for r in rejected} <= set(REASONS)
    details = {r["id"]: r["detail"] for r in rejected}
    assert details["bad-turn-order"] == "turn 0 is 'gpt', expected 'human'"
    assert details["bad-placeholders"] == "2 <image> placeholder(s), 1 image(s)"
    assert details["bad-empty-answer"] == "turn 1 (gpt) is empty"
    assert details["bad-no-turns"] == "no conversations"
    assert details["bad-truncated-image"] == "bad-truncated-image.png: OSError: image file is truncated"
    assert details["bad-missing-image"].startswith("bad-missing-image.png not found under ")


def test_converted_samples_keep_conversations_ids_and_image_order(
    converted: Path, records: dict[str, dict], fixture: dict[str, Path]
) -> None:
    samples = _raw_samples(converted)
    assert set(samples) == set(records) - set(SCRIPT["BAD"])
    order = list(records)
    for rid, sample in samples.items():
        record, info = records[rid], sample["json"]
        paths = [record["image"]] if isinstance(record.get("image"), str) else record.get("image", [])
        assert sample["key"] == f"{order.index(rid):09d}"
        assert info["images"] == paths
        assert info["modality"] == ("image" if paths else "text")
        assert info["length"] == sum(len(t["value"].split()) for t in info["conversations"])
        assert "num_tokens" not in info  # no tokenizer given
        assert [k.split(".")[0] for k in sample["images"]] == [f"img{i:03d}" for i in range(len(paths))]
        turns = [t for t in record["conversations"] if t["from"] != "system"]
        if rid.startswith("no-placeholder"):
            assert info["conversations"][0]["value"] == "<image>\n" + turns[0]["value"]
            assert info["conversations"][1:] == turns[1:]
        else:
            assert info["conversations"] == turns
    assert samples["system"]["json"]["system"] == SCRIPT["SYSTEM"]
    assert [k for k, s in samples.items() if "system" in s["json"]] == ["system"]

    # 12 images: members img000 ... img011 keep the record's order past 9 (sorted names = placeholder order).
    multi = samples["multi-12"]
    names = sorted(multi["images"])
    assert names == [f"img{i:03d}.{'jpg' if i == 1 else 'png'}" for i in range(12)]
    files = [(fixture["images"] / p).read_bytes() for p in records["multi-12"]["image"]]
    assert [multi["images"][n] for n in names] == files


def test_png_and_jpg_bytes_are_kept_and_bmp_is_reencoded_losslessly(
    converted: Path, records: dict[str, dict], fixture: dict[str, Path]
) -> None:
    samples = _raw_samples(converted)
    assert set(KEPT_FORMATS.values()) <= set(IMAGE_EXTENSIONS)
    for rid, ext in (("shapes-000", "png"), ("jpg", "jpg")):
        assert samples[rid]["images"] == {f"img000.{ext}": (fixture["images"] / records[rid]["image"]).read_bytes()}
    ((name, data),) = samples["bmp"]["images"].items()
    assert name == "img000.png"
    with Image.open(io.BytesIO(data)) as png, Image.open(fixture["images"] / "bmp.bmp") as bmp:
        assert (png.format, bmp.format) == ("PNG", "BMP")
        assert png.mode == bmp.mode and png.size == bmp.size
        assert png.tobytes() == bmp.tobytes()


def test_the_training_loader_reads_the_converted_shards(
    converted: Path, records: dict[str, dict], fixture: dict[str, Path], tokenizer
) -> None:
    """Validation mode reads every sample once through the real SampleEncoder: images in order, answers, the
    system turn rendered."""
    meta = json.loads((converted / "meta.json").read_text())
    urls = [str(converted / s) for s in meta["train_shards"] + meta["val_shards"]]
    encoder = _encoder(tokenizer)
    pipeline = build_pipeline(
        urls, encoder, batch_size=4, pad_id=tokenizer.pad_token_id, on_error="raise", training=False
    )
    by_key = {f"{i:09d}": r for i, r in enumerate(records.values())}
    seen = {}
    for batch in pipeline:
        seen.update(zip(batch["keys"], zip(batch["answers"], batch["num_images"].tolist(), strict=True), strict=True))
    assert len(seen) == NUM - 6
    for key, (answer, num_images) in seen.items():
        record = by_key[key]
        assert answer == record["conversations"][-1]["value"]
        assert num_images == len([record["image"]] if isinstance(record.get("image"), str) else record.get("image", []))

    samples = _raw_samples(converted)
    for rid in ("multi-12", "bmp", "jpg"):
        raw = {
            "__key__": samples[rid]["key"],
            "json": json.dumps(samples[rid]["json"]).encode(),
            **samples[rid]["images"],
        }
        encoded = encoder(raw)
        paths = records[rid]["image"] if isinstance(records[rid]["image"], list) else [records[rid]["image"]]
        transform = image_transform((64, 64), (0.0,) * 3, (1.0,) * 3)
        expected = [transform(Image.open(fixture["images"] / p).convert("RGB")) for p in paths]
        assert len(encoded["images"]) == len(expected)
        assert all(torch.equal(a, b) for a, b in zip(encoded["images"], expected, strict=True))
    system = encoder({"json": json.dumps(samples["system"]["json"]).encode(), **samples["system"]["images"]})
    assert tokenizer.decode(system["input_ids"]).startswith(f"<s>{SCRIPT['SYSTEM']}\n")


def test_num_tokens_are_the_loaders_count_and_max_tokens_rejects(
    fixture: dict[str, Path], records: dict[str, dict], tokenizer, tmp_path: Path
) -> None:
    """With 10 slots per image and --max-tokens 120, only the 12-image sample is too long; every stored count is
    what the loader's encoder produces."""
    settings = ConvertSettings(
        val_fraction=0.1, shard_bytes=8000, tokenizer=str(fixture["tokenizer"]), max_tokens=120, image_tokens=10
    )
    meta = convert_llava(fixture["json"], fixture["images"], tmp_path / "out", settings).meta
    assert meta["rejected"] == dict(sorted({**{r: 1 for r in SCRIPT["BAD"].values()}, "too_long": 1}.items()))
    rejected = [json.loads(line) for line in (tmp_path / "out" / "rejected.jsonl").read_text().splitlines()]
    (too_long,) = [r for r in rejected if r["reason"] == "too_long"]
    multi = records["multi-12"]
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    count = len(encode_conversation(tokenizer, multi["conversations"], 10, 12, image_id).input_ids)
    assert count > 120
    assert (too_long["id"], too_long["reason"], too_long["detail"]) == (
        "multi-12",
        "too_long",
        f"{count} tokens, over --max-tokens 120",
    )
    samples = _raw_samples(tmp_path / "out")
    assert len(samples) == NUM - 7
    encoder = _encoder(tokenizer, num_image_tokens=10)
    for sample in samples.values():
        raw = {"json": json.dumps(sample["json"]).encode(), **sample["images"]}
        assert sample["json"]["num_tokens"] == len(encoder(raw)["input_ids"]) <= 120


class _StopAfter(Progress):
    """Interrupts the conversion with KeyboardInterrupt (as Ctrl-C does) after ``count`` samples of ``phase``."""

    def __init__(self, phase: str, count: int) -> None:
        self.target, self.count, self.current = phase, count, ""

    def phase(self, name: str, total: int, done: int = 0) -> None:
        self.current = name

    def advance(self) -> None:
        if self.current == self.target:
            self.count -= 1
            if self.count == 0:
                raise KeyboardInterrupt


KILL_SCRIPT = """
import os, signal, sys
from skipvision.data.llava import ConvertSettings, Progress, convert_llava

class KillAfter(Progress):
    written = 0
    def advance(self):
        self.written += 1
        if self.written == {count}:  # check: 48 records, then train samples
            os.kill(os.getpid(), signal.SIGKILL)

settings = ConvertSettings(val_fraction=0.1, shard_bytes=8000)
convert_llava(sys.argv[1], sys.argv[2], sys.argv[3], settings, progress=KillAfter())
"""


def test_resume_after_sigkill_is_byte_identical(fixture: dict[str, Path], converted: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    script = KILL_SCRIPT.format(count=NUM + 25)
    done = subprocess.run(
        [sys.executable, "-c", script, str(fixture["json"]), str(fixture["images"]), str(out)],
        env=process_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    finished = sorted(p.name for p in (out / "train").glob("*.tar"))
    partial = sorted(p.name for p in (out / "train").glob("*.part"))
    assert finished and partial == [f"llava-train-{len(finished):06d}.tar.part"]
    assert not (out / "meta.json").exists() and (out / "plan.json").is_file()

    summary = convert_llava(fixture["json"], fixture["images"], out, SETTINGS)
    assert summary.kept_shards == len(finished)
    assert _tree(out) == _tree(converted)


def test_ctrl_c_leaves_the_open_shard_partial_and_resume_is_byte_identical(
    fixture: dict[str, Path], converted: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        convert_llava(fixture["json"], fixture["images"], out, SETTINGS, progress=_StopAfter("train", 25))
    finished = sorted(p.name for p in (out / "train").glob("*.tar"))
    assert sorted(p.name for p in (out / "train").glob("*.part")) == [f"llava-train-{len(finished):06d}.tar.part"]
    convert_llava(fixture["json"], fixture["images"], out, SETTINGS)
    assert _tree(out) == _tree(converted)
    # A second run over a finished conversion keeps everything and rewrites nothing new.
    again = convert_llava(fixture["json"], fixture["images"], out, SETTINGS)
    assert again.kept_shards == len(again.meta["train_shards"]) + len(again.meta["val_shards"])
    assert _tree(out) == _tree(converted)


def test_workers_do_not_change_the_output(fixture: dict[str, Path], converted: Path, tmp_path: Path) -> None:
    convert_llava(fixture["json"], fixture["images"], tmp_path / "out", SETTINGS, workers=2)
    assert _tree(tmp_path / "out") == _tree(converted)


def test_output_folder_with_other_data_is_refused_and_kept(
    fixture: dict[str, Path], converted: Path, tmp_path: Path
) -> None:
    before = _tree(converted)
    other = ConvertSettings(val_fraction=0.1, shard_bytes=8000, seed=1)
    with pytest.raises(OutputExistsError, match="holds a conversion with another seed; pass --overwrite"):
        convert_llava(fixture["json"], fixture["images"], converted, other)
    assert _tree(converted) == before
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="holds other files; pass --overwrite"):
        convert_llava(fixture["json"], fixture["images"], foreign, SETTINGS)
    assert (foreign / "notes.txt").read_text() == "mine"
    convert_llava(fixture["json"], fixture["images"], foreign, SETTINGS, overwrite=True)
    assert _tree(foreign) == before


def test_bad_input_files(fixture: dict[str, Path], tmp_path: Path) -> None:
    images, out = fixture["images"], tmp_path / "out"
    (tmp_path / "object.json").write_text('{"id": 1}')
    with pytest.raises(LlavaInputError, match=r"object.json holds a JSON dict, not a list of LLaVA records"):
        convert_llava(tmp_path / "object.json", images, out)
    (tmp_path / "bad.jsonl").write_text('{"id": 1, "conversations": []}\n\n{"id": 2,\n')
    with pytest.raises(LlavaInputError, match=r"bad.jsonl line 3 is not valid JSON"):
        convert_llava(tmp_path / "bad.jsonl", images, out)
    with pytest.raises(MissingFileError, match="--images .*nowhere: no such folder"):
        convert_llava(fixture["json"], tmp_path / "nowhere", out)
    assert not out.exists()

    lines = [{"id": "a", "conversations": []}, ["not", "an", "object"], {"id": "c", "conversations": "hi"}]
    (tmp_path / "records.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    meta = convert_llava(tmp_path / "records.jsonl", images, out).meta
    assert (meta["num_train"], meta["num_val"], meta["rejected"]) == (0, 0, {"bad_record": 2, "no_turns": 1})
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    assert [(r["id"], r["index"], r["line"], r["reason"]) for r in rejected] == [
        ("a", 0, 1, "no_turns"),
        (None, 1, 2, "bad_record"),
        ("c", 2, 3, "bad_record"),
    ]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "skipvision", "data", "llava", *args],
        env=process_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
    )


def test_cli_converts_and_fails_in_one_line(fixture: dict[str, Path], converted: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    inputs = ["--json", str(fixture["json"]), "--images", str(fixture["images"])]
    done = _cli(*inputs, "--out", str(out), "--val-fraction", "0.1", "--shard-bytes", "8KB", "--workers", "1")
    assert done.returncode == 0, done.stderr
    shards = len(json.loads((converted / "meta.json").read_text())["train_shards"]) + 1
    assert (
        done.stdout
        == f"wrote 38 train / 4 val samples in {shards} shards to {out}; 6 rejected -> {out}/rejected.jsonl\n"
    )
    assert _tree(out) == _tree(converted)

    listed, x = tmp_path / "list.json", str(tmp_path / "x")
    listed.write_text('{"not": "a list"}')
    images, settings = str(fixture["images"]), ["--val-fraction", "0.1", "--shard-bytes", "8KB"]
    failures = [
        (
            ["--json", str(listed), "--images", images, "--out", x],
            f"{listed} holds a JSON dict, not a list of LLaVA records",
        ),
        ([*inputs[:2], "--images", f"{x}/none", "--out", x], f"--images {x}/none: no such folder"),
        (
            [*inputs, "--out", str(out), *settings, "--seed", "3"],
            f"--out {out} holds a conversion with another seed; pass --overwrite to replace it",
        ),
        (
            [*inputs, "--out", x, "--max-tokens", "10"],
            "--max-tokens needs --tokenizer (tokens are counted with its chat template)",
        ),
    ]
    for args, message in failures:
        done = _cli(*args)
        assert (done.returncode, done.stdout, done.stderr) == (2, "", f"skipvision data: error: {message}\n")
    assert _tree(out) == _tree(converted)


def _raw(key: str, length: int, image: bool) -> dict:
    sample = {"__key__": key, "json": json.dumps({"conversations": [], "length": length}).encode()}
    return {**sample, "img000.png": b""} if image else sample


def _keys(samples) -> list[str]:
    return [s["__key__"] for s in samples]


def test_grouping_sorts_each_round_by_length_within_one_modality() -> None:
    stream = [
        _raw(f"i{n}", n, True) if i % 2 == 0 else _raw(f"t{n}", n, False)
        for i, n in enumerate([5, 4, 1, 8, 7, 2, 3, 6])
    ]
    out = _keys(GroupByModalityLength(batch_size=2, buffer=8, seed=0)(iter(stream)))
    batches = {tuple(out[i : i + 2]) for i in range(0, 8, 2)}
    assert len(out) == 8 and batches == {("i1", "i3"), ("i5", "i7"), ("t2", "t4"), ("t6", "t8")}
    assert out == _keys(GroupByModalityLength(batch_size=2, buffer=8, seed=0)(iter(stream)))
    orders = {tuple(_keys(GroupByModalityLength(2, 8, seed)(iter(stream)))) for seed in range(8)}
    assert len(orders) > 1  # the batches' order is shuffled by the seed


def test_grouping_holds_back_the_newest_and_mixes_only_the_last_leftovers() -> None:
    # buffer 4: image pool [3, 1, 2] releases its two oldest (1, 3) and keeps 2; the text pool [9] keeps its one.
    stream = [_raw("i3", 3, True), _raw("i1", 1, True), _raw("i2", 2, True), _raw("t9", 9, False)]
    stream += [_raw("i0", 0, True), _raw("t5", 5, False), _raw("t4", 4, False)]
    out = _keys(GroupByModalityLength(batch_size=2, buffer=4, seed=0)(iter(stream)))
    assert out[:2] == ["i1", "i3"]
    # End: images [2, 0] -> (i0, i2); texts [9, 5, 4] -> (t5, t9) from the two oldest; leftover t4 last.
    assert {tuple(out[2:4]), tuple(out[4:6])} == {("i0", "i2"), ("t5", "t9")} and out[6:] == ["t4"]


def test_group_by_modality_length_in_the_training_loader(tmp_path: Path, tokenizer) -> None:
    """12 image and 4 text-only samples with distinct lengths: every batch of 2 is one modality, the batches are
    the length-sorted pairs, and there are as many batches as without grouping."""
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(images / "red.png")
    records = [
        {
            "id": f"{'i' if n < 12 else 't'}{n}",
            **({"image": "red.png"} if n < 12 else {}),
            "conversations": [
                {"from": "human", "value": "word " * (1 + (n * 7) % 16)},
                {"from": "gpt", "value": "red"},
            ],
        }
        for n in range(16)
    ]
    (tmp_path / "set.json").write_text(json.dumps(records))
    convert_llava(tmp_path / "set.json", images, tmp_path / "out", ConvertSettings(val_fraction=0.0))
    urls = [str(p) for p in sorted((tmp_path / "out" / "train").glob("*.tar"))]
    words = {r["id"]: 1 + (n * 7) % 16 for n, r in enumerate(records)}  # distinct: the sort order is known

    def batches(group: bool) -> list[list[str]]:
        pipeline = build_pipeline(
            urls,
            _encoder(tokenizer),
            batch_size=2,
            pad_id=tokenizer.pad_token_id,
            on_error="raise",
            training=True,
            resampled=False,
            shuffle_buffer=16,
            group_by_modality_length=group,
        )
        ids = {f"{n:09d}": r["id"] for n, r in enumerate(records)}
        return [[ids[k] for k in batch["keys"]] for batch in pipeline]

    grouped = batches(True)
    assert len(grouped) == len(batches(False)) == 8
    expected = set()
    for kind in "it":
        ordered = sorted((rid for rid in words if rid[0] == kind), key=words.get)
        expected |= {tuple(ordered[i : i + 2]) for i in range(0, len(ordered), 2)}
    assert {tuple(b) for b in grouped} == expected


def test_recipe_accepts_group_by_modality_length() -> None:
    assert load_recipe(TINY_RECIPE).data.group_by_modality_length is False
    assert load_recipe(TINY_RECIPE, ["data.group_by_modality_length=true"]).data.group_by_modality_length is True


def test_fixture_script_writes_eval_questions(fixture: dict[str, Path]) -> None:
    questions = [json.loads(line) for line in fixture["eval"].read_text().splitlines()]
    assert len(questions) == 16
    assert all(set(q) == {"id", "image", "question", "answer", "category"} for q in questions)
    assert all((fixture["json"].parent / q["image"]).is_file() and "<image>" not in q["question"] for q in questions)
    assert {q["category"] for q in questions} <= set(QUESTION_TYPES)
