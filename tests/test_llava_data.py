"""``skipvision data llava`` on the LLaVA-format fixture (scripts/make_llava_fixture.py): what it rejects and why,
shards the training loader reads back exactly, byte-identical output after an interruption, and the inputs and
outputs it refuses (docs/data.md; grouping by modality and length: tests/test_grouping.py)."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import runpy
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import webdataset as wds
from PIL import Image

from skipvision.cli import make_parser
from skipvision.data.chat import encode_conversation
from skipvision.data.llava import ConvertSettings, Progress, convert_llava
from skipvision.data.llava_samples import (
    KEPT_FORMATS,
    REASONS,
    LlavaInputError,
    Record,
    Rejected,
    build_sample,
    parse_record,
)
from skipvision.data.pipeline import SampleEncoder, build_pipeline
from skipvision.data.samples import IMAGE_EXTENSIONS, image_keys
from skipvision.data.shapes import QUESTION_TYPES
from skipvision.data.tokenizer import IMAGE_TOKEN, load_tokenizer, prepare_tokenizer
from skipvision.data.views import image_transform
from skipvision.errors import DataError, MissingFileError, OutputExistsError

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
            images = {k: sample[k] for k in image_keys(sample)}
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

    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(LlavaInputError, match=r"empty.json holds no records"):
        convert_llava(tmp_path / "empty.json", images, out)
    assert not out.exists()

    # Every record rejected: no sample to train on is an error, and the reasons are kept.
    lines = [{"id": "a", "conversations": []}, ["not", "an", "object"], {"id": "c", "conversations": "hi"}]
    (tmp_path / "records.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    with pytest.raises(LlavaInputError) as failed:
        convert_llava(tmp_path / "records.jsonl", images, out)
    assert str(failed.value) == (
        "no sample to train on: all 3 records were rejected (bad_record 2, no_turns 1); each is listed with its "
        f"reason in {out / 'rejected.jsonl'}"
    )
    assert not (out / "meta.json").exists()
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    assert [(r["id"], r["index"], r["line"], r["reason"]) for r in rejected] == [
        ("a", 0, 1, "no_turns"),
        (None, 1, 2, "bad_record"),
        ("c", 2, 3, "bad_record"),
    ]


def _small_set(tmp_path: Path, records: list[dict], image_names: tuple[str, ...] = ("red.png",)) -> tuple[Path, Path]:
    """``records`` as tmp_path/set.json with an images folder holding 8x8 PNGs of ``image_names``."""
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    for name in image_names:
        Image.new("RGB", (8, 8), (200, 30, 30)).save(images / name)
    (tmp_path / "set.json").write_text(json.dumps(records))
    return tmp_path / "set.json", images


def _record(rid: str, human: str = "<image>\nWhat colour?", gpt: str = "red", image: str | None = "red.png") -> dict:
    turns = [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]
    return {"id": rid, **({} if image is None else {"image": image}), "conversations": turns}


def test_a_placeholder_outside_the_human_turns_is_rejected_naming_the_turn() -> None:
    answer = _record("a", gpt="It is <image> red.")
    with pytest.raises(Rejected) as rejected:
        parse_record(answer)
    assert (rejected.value.reason, rejected.value.detail) == (
        "placeholder_mismatch",
        "turn 1 (gpt) has <image>; only human turns may",
    )
    # The system turn's placeholder would otherwise make up the count of a record whose human turn has none.
    system = _record("s", human="What colour?")
    system["conversations"].insert(0, {"from": "system", "value": "Look at <image> first."})
    with pytest.raises(Rejected) as rejected:
        parse_record(system)
    assert (rejected.value.reason, rejected.value.detail) == (
        "placeholder_mismatch",
        "turn 0 (system) has <image>; only human turns may",
    )
    later = _record("l", human="What colour?")
    later["conversations"] += [{"from": "human", "value": "And now?"}, {"from": "gpt", "value": "<image>"}]
    with pytest.raises(Rejected, match=r"turn 3 \(gpt\) has <image>"):
        parse_record(later)
    assert parse_record(_record("ok", human="What colour?")).turns[0]["value"] == "<image>\nWhat colour?"


def test_an_out_folder_that_is_in_or_around_the_input_is_refused_and_nothing_is_deleted(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    json_path, images = _small_set(data, [_record("a")])
    before = _tree(tmp_path)
    cases = [
        (images, f"--out {images} is --images {images}"),
        (images / "shards", f"--out {images / 'shards'} is inside --images {images}"),
        (data, f"--out {data} holds --images {images}"),
        (images / ".." / ".." / "data" / "images", "is --images"),  # the same folder, spelt otherwise
    ]
    for out, message in cases:
        for overwrite in (False, True):
            with pytest.raises(LlavaInputError, match=re.escape(message)):
                convert_llava(json_path, images, out, overwrite=overwrite)
    elsewhere = tmp_path / "other-images"
    shutil.copytree(images, elsewhere)
    with pytest.raises(LlavaInputError, match=re.escape(f"--out {data} holds --json {json_path}")):
        convert_llava(json_path, elsewhere, data, overwrite=True)
    shutil.rmtree(elsewhere)
    assert _tree(tmp_path) == before


def test_val_never_takes_the_last_accepted_sample(tmp_path: Path) -> None:
    json_path, images = _small_set(tmp_path, [_record("only"), _record("bad", gpt=" ")])
    meta = convert_llava(json_path, images, tmp_path / "out", ConvertSettings(val_fraction=0.01)).meta
    assert (meta["num_train"], meta["num_val"], meta["val_shards"]) == (1, 0, [])
    json_path, images = _small_set(tmp_path, [_record("a"), _record("b")])
    meta = convert_llava(json_path, images, tmp_path / "two", ConvertSettings(val_fraction=0.01)).meta
    assert (meta["num_train"], meta["num_val"]) == (1, 1)  # at least one for val when there are two


class _DeleteAtWrite(Progress):
    """Deletes an image once the check is done, as if the input changed between the check and the write."""

    def __init__(self, image: Path) -> None:
        self.image = image

    def phase(self, name: str, total: int, done: int = 0) -> None:
        if name == "train":
            self.image.unlink()


def test_an_image_gone_since_the_check_is_one_data_error_naming_the_record(tmp_path: Path) -> None:
    records = [_record("a"), _record("b", image="blue.png")]
    json_path, images = _small_set(tmp_path, records, ("red.png", "blue.png"))
    settings = ConvertSettings(val_fraction=0.0)
    for workers in (1, 2):  # from a worker process too: the error travels back to the writer whole
        out = tmp_path / f"out{workers}"
        with pytest.raises(DataError) as failed:
            convert_llava(
                json_path, images, out, settings, workers=workers, progress=_DeleteAtWrite(images / "blue.png")
            )
        assert str(failed.value) == (
            f"record 1 (id 'b'): blue.png not found under {images.resolve()} (missing_image), but it was readable "
            "when the input was checked (plan.json): restore the image, or convert again with --overwrite"
        )
        assert not (out / "meta.json").exists()
        Image.new("RGB", (8, 8), (0, 0, 200)).save(images / "blue.png")

    # The CLI prints it on one line, exit status 2: here the image went missing before a resume.
    (images / "blue.png").unlink()
    done = _cli(
        "--json", str(json_path), "--images", str(images), "--out", str(tmp_path / "out1"), "--val-fraction", "0"
    )
    assert (done.returncode, done.stdout) == (2, "")
    *bar, error = done.stderr.splitlines()  # the bar's last state, then the error
    assert [line.split()[0] for line in bar] == ["train"]
    assert error.startswith("skipvision data: error: record 1 (id 'b'): blue.png not found under ")
    assert error.endswith("restore the image, or convert again with --overwrite")


def test_each_image_is_decoded_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """PNG and JPEG bytes are kept: only the check decodes them; a BMP is decoded again to be re-encoded."""
    images = tmp_path / "images"
    images.mkdir()
    for name, fmt in (("a.png", "PNG"), ("b.jpg", "JPEG"), ("c.bmp", "BMP")):
        Image.new("RGB", (8, 8), (200, 30, 30)).save(images / name, format=fmt)
    records = [_record(name, image=name) for name in ("a.png", "b.jpg", "c.bmp")]
    (tmp_path / "set.json").write_text(json.dumps(records))
    decoded: list[str] = []
    real = Image._getdecoder

    def counting(mode, decoder_name, *args, **kwargs):
        decoded.append(decoder_name)
        return real(mode, decoder_name, *args, **kwargs)

    monkeypatch.setattr(Image, "_getdecoder", counting)
    convert_llava(tmp_path / "set.json", images, tmp_path / "out", ConvertSettings(val_fraction=0.0))
    assert sorted(decoded) == ["jpeg", "raw", "raw", "zip"]  # zip: PNG; raw: BMP


def test_image_members_keep_their_order_past_1000_images(tmp_path: Path) -> None:
    count = 1001
    _, images = _small_set(tmp_path, [])
    record = _record("many", human="<image>" * count + "How many?", gpt="many", image=None)
    record["image"] = ["red.png"] * count
    sample = build_sample(Record(0, None, record), None, str(images))
    names = image_keys(sample)  # the loader's order
    assert names[:2] == ["img0000.png", "img0001.png"] and names[-1] == "img1000.png"
    assert names == [f"img{i:04d}.png" for i in range(count)] and len(names) == count
    assert image_keys({f"img{i:03d}.png": b"" for i in range(12)}) == [f"img{i:03d}.png" for i in range(12)]


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
        (
            [*inputs, "--out", images, "--overwrite"],
            f"--out {images} is --images {images}; give an output folder outside the input",
        ),
    ]
    for args, message in failures:
        done = _cli(*args)
        assert (done.returncode, done.stdout, done.stderr) == (2, "", f"skipvision data: error: {message}\n")
    assert _tree(out) == _tree(converted)
    assert (fixture["images"] / "bmp.bmp").is_file()  # --out on the images deleted nothing


def test_the_cli_defaults_are_the_settings_defaults() -> None:
    args = make_parser().parse_args(["data", "llava", "--json", "a.json", "--images", "i", "--out", "o"])
    assert ConvertSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ConvertSettings)}) == (
        ConvertSettings()
    )


def test_fixture_script_writes_eval_questions(fixture: dict[str, Path]) -> None:
    questions = [json.loads(line) for line in fixture["eval"].read_text().splitlines()]
    assert len(questions) == 16
    assert all(set(q) == {"id", "image", "question", "answer", "category"} for q in questions)
    assert all((fixture["json"].parent / q["image"]).is_file() and "<image>" not in q["question"] for q in questions)
    assert {q["category"] for q in questions} <= set(QUESTION_TYPES)
