"""``skipvision data llava`` on the LLaVA-format fixture (scripts/make_llava_fixture.py): what it rejects and why,
and shards the training loader reads back exactly (docs/data.md; faults, resume and refused inputs:
tests/test_llava_faults.py; grouping by modality and length: tests/test_grouping.py)."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import torch
from PIL import Image

from skipvision.data.chat import encode_conversation
from skipvision.data.llava import ConvertSettings, convert_llava
from skipvision.data.llava_samples import (
    KEPT_FORMATS,
    REASONS,
)
from skipvision.data.pipeline import build_pipeline
from skipvision.data.samples import IMAGE_EXTENSIONS
from skipvision.data.shapes import QUESTION_TYPES
from skipvision.data.tokenizer import IMAGE_TOKEN
from skipvision.data.views import image_transform

from .llava_fixtures import NUM, NUM_VAL, SCRIPT, raw_samples, sample_encoder


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
    samples = raw_samples(converted)
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
    samples = raw_samples(converted)
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
    encoder = sample_encoder(tokenizer)
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

    samples = raw_samples(converted)
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
    samples = raw_samples(tmp_path / "out")
    assert len(samples) == NUM - 7
    encoder = sample_encoder(tokenizer, num_image_tokens=10)
    for sample in samples.values():
        raw = {"json": json.dumps(sample["json"]).encode(), **sample["images"]}
        assert sample["json"]["num_tokens"] == len(encoder(raw)["input_ids"]) <= 120


def test_fixture_script_writes_eval_questions(fixture: dict[str, Path]) -> None:
    questions = [json.loads(line) for line in fixture["eval"].read_text().splitlines()]
    assert len(questions) == 16
    assert all(set(q) == {"id", "image", "question", "answer", "category"} for q in questions)
    assert all((fixture["json"].parent / q["image"]).is_file() and "<image>" not in q["question"] for q in questions)
    assert {q["category"] for q in questions} <= set(QUESTION_TYPES)
