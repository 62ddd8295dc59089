"""``skipvision data llava`` under faults: byte-identical output after an interruption, the inputs and outputs it
refuses, and its one-line CLI errors (docs/data.md "Resume", "Rejected samples")."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from skipvision.cli import make_parser
from skipvision.data.llava import ConvertSettings, Progress, convert_llava
from skipvision.data.llava_samples import (
    LlavaInputError,
    Record,
    Rejected,
    build_sample,
    parse_record,
)
from skipvision.data.samples import image_keys
from skipvision.errors import DataError, MissingFileError, OutputExistsError

from .llava_fixtures import CLI_TIMEOUT_S, NUM, SETTINGS, tree
from .processes import REPO, process_env


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
    assert tree(out) == tree(converted)


def test_ctrl_c_leaves_the_open_shard_partial_and_resume_is_byte_identical(
    fixture: dict[str, Path], converted: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        convert_llava(fixture["json"], fixture["images"], out, SETTINGS, progress=_StopAfter("train", 25))
    finished = sorted(p.name for p in (out / "train").glob("*.tar"))
    assert sorted(p.name for p in (out / "train").glob("*.part")) == [f"llava-train-{len(finished):06d}.tar.part"]
    convert_llava(fixture["json"], fixture["images"], out, SETTINGS)
    assert tree(out) == tree(converted)
    # A second run over a finished conversion keeps everything and rewrites nothing new.
    again = convert_llava(fixture["json"], fixture["images"], out, SETTINGS)
    assert again.kept_shards == len(again.meta["train_shards"]) + len(again.meta["val_shards"])
    assert tree(out) == tree(converted)


def test_workers_do_not_change_the_output(fixture: dict[str, Path], converted: Path, tmp_path: Path) -> None:
    convert_llava(fixture["json"], fixture["images"], tmp_path / "out", SETTINGS, workers=2)
    assert tree(tmp_path / "out") == tree(converted)


def test_output_folder_with_other_data_is_refused_and_kept(
    fixture: dict[str, Path], converted: Path, tmp_path: Path
) -> None:
    before = tree(converted)
    other = ConvertSettings(val_fraction=0.1, shard_bytes=8000, seed=1)
    with pytest.raises(OutputExistsError, match="holds a conversion with another seed; pass --overwrite"):
        convert_llava(fixture["json"], fixture["images"], converted, other)
    assert tree(converted) == before
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="holds other files; pass --overwrite"):
        convert_llava(fixture["json"], fixture["images"], foreign, SETTINGS)
    assert (foreign / "notes.txt").read_text() == "mine"
    convert_llava(fixture["json"], fixture["images"], foreign, SETTINGS, overwrite=True)
    assert tree(foreign) == before


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
    before = tree(tmp_path)
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
    assert tree(tmp_path) == before


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
    assert tree(out) == tree(converted)

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
    assert tree(out) == tree(converted)
    assert (fixture["images"] / "bmp.bmp").is_file()  # --out on the images deleted nothing


def test_the_cli_defaults_are_the_settings_defaults() -> None:
    args = make_parser().parse_args(["data", "llava", "--json", "a.json", "--images", "i", "--out", "o"])
    assert ConvertSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ConvertSettings)}) == (
        ConvertSettings()
    )
