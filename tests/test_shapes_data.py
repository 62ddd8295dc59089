"""Tests for the synthetic shapes VQA dataset, its WebDataset shards and the trained tokenizer."""

from __future__ import annotations

import math
import os
import random
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

os.environ["HF_HUB_OFFLINE"] = "1"

from skipvision.data.shapes import (
    COLOURS,
    NUMBER_WORDS,
    QUESTION_TYPES,
    SHAPES,
    ShapesSettings,
    dataset_is_complete,
    generate_shapes,
    make_sample,
    settings_mismatch,
)
from skipvision.data.tokenizer import IMAGE_TOKEN, load_tokenizer, train_tokenizer

NUM_TRAIN, NUM_VAL, SHARD_SIZE = 40, 10, 16
ANSWERS = {
    "colour": set(COLOURS),
    "shape": set(SHAPES),
    "count": set(NUMBER_WORDS),
    "position": {"yes", "no"},
    "existence": {"yes", "no"},
}


def _generate(out_dir: Path, seed: int = 0) -> dict:
    return generate_shapes(out_dir, num_train=NUM_TRAIN, num_val=NUM_VAL, seed=seed, shard_size=SHARD_SIZE)


def _read(root: Path, shards: list[str]) -> list[dict]:
    urls = [str(root / s) for s in shards]
    return list(wds.WebDataset(urls, shardshuffle=False).decode("pil"))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("shapes") / "ds"
    return root, _generate(root)


def _find(objects: list[dict], colour: str, shape: str) -> dict:
    (match,) = [o for o in objects if o["colour"] == colour and o["shape"] == shape]
    return match


def _expected_answer(question: str, objects: list[dict]) -> str:
    """Answer ``question`` from the stored scene, independently of the generator's code path."""
    if m := re.fullmatch(r"What colour is the (\w+)\?", question):
        (match,) = [o for o in objects if o["shape"] == m[1]]
        return match["colour"]
    if m := re.fullmatch(r"What shape is the (\w+) object\?", question):
        (match,) = [o for o in objects if o["colour"] == m[1]]
        return match["shape"]
    if question == "How many shapes are there?":
        return NUMBER_WORDS[len(objects)]
    if m := re.fullmatch(r"How many (\w+)s are there\?", question):
        return NUMBER_WORDS[sum(o["shape"] == m[1] for o in objects)]
    if m := re.fullmatch(r"Is the (\w+) (\w+) (left of|above) the (\w+) (\w+)\?", question):
        a, b = _find(objects, m[1], m[2]), _find(objects, m[4], m[5])
        axis = "x" if m[3] == "left of" else "y"
        assert abs(a[axis] - b[axis]) >= 8, "position questions must be visually unambiguous"
        return "yes" if a[axis] < b[axis] else "no"
    if m := re.fullmatch(r"Is there an? (\w+) (\w+)\?", question):
        return "yes" if any(o["colour"] == m[1] and o["shape"] == m[2] for o in objects) else "no"
    raise AssertionError(f"unexpected question {question!r}")


def test_same_seed_identical_different_seed_differs(tmp_path: Path, dataset: tuple[Path, dict]) -> None:
    root, meta = dataset
    again = tmp_path / "again"
    assert _generate(again) == meta
    for split in ("train_shards", "val_shards"):
        first, second = _read(root, meta[split]), _read(again, meta[split])
        assert [s["json"] for s in first] == [s["json"] for s in second]
        for a, b in zip(first, second, strict=True):
            assert np.array_equal(np.asarray(a["png"]), np.asarray(b["png"]))
        for shard in meta[split]:
            assert (root / shard).read_bytes() == (again / shard).read_bytes()

    other = _generate(tmp_path / "other", seed=1)
    assert [s["json"] for s in _read(tmp_path / "other", other["train_shards"])] != [
        s["json"] for s in _read(root, meta["train_shards"])
    ]


def test_train_and_val_differ(dataset: tuple[Path, dict]) -> None:
    root, meta = dataset
    train = [s["json"] for s in _read(root, meta["train_shards"])[:NUM_VAL]]
    val = [s["json"] for s in _read(root, meta["val_shards"])]
    assert train != val


def test_shards_round_trip(dataset: tuple[Path, dict]) -> None:
    root, meta = dataset
    for split, expected in (("train", NUM_TRAIN), ("val", NUM_VAL)):
        samples = _read(root, meta[f"{split}_shards"])
        assert len(samples) == expected
        keys = [s["__key__"] for s in samples]
        assert len(set(keys)) == expected
        assert all("." not in k and k.startswith(f"{split}-") for k in keys)
        for s in samples:
            assert s["png"].mode == "RGB" and s["png"].size == (64, 64)
            human, gpt = s["json"]["conversations"]
            assert human["from"] == "human" and human["value"].startswith("<image>\n")
            assert gpt["from"] == "gpt" and gpt["value"] in ANSWERS[s["json"]["qtype"]]


def test_answers_match_scene_and_pixels(dataset: tuple[Path, dict]) -> None:
    root, meta = dataset
    for s in _read(root, meta["train_shards"]):
        sample, pixels = s["json"], np.asarray(s["png"])
        objects = sample["objects"]
        human, gpt = sample["conversations"]
        assert gpt["value"] == _expected_answer(human["value"].removeprefix("<image>\n"), objects)
        assert 1 <= len(objects) <= 4
        for i, o in enumerate(objects):
            half = o["size"] // 2
            assert half <= o["x"] < 64 - half and half <= o["y"] < 64 - half
            # Every shape covers its centre pixel, so the image must show the stored colour there.
            assert tuple(pixels[o["y"], o["x"]]) == COLOURS[o["colour"]]
            for p in objects[i + 1 :]:
                assert max(abs(o["x"] - p["x"]), abs(o["y"] - p["y"])) > half + p["size"] // 2


def test_question_types_and_yes_no_balanced() -> None:
    rng = random.Random(123)
    samples = [make_sample(rng, 64)[1] for _ in range(200)]
    counts = Counter(s["qtype"] for s in samples)
    assert set(counts) == set(QUESTION_TYPES)
    assert max(counts.values()) <= 0.35 * len(samples)
    for qtype in ("position", "existence"):
        answers = Counter(s["conversations"][1]["value"] for s in samples if s["qtype"] == qtype)
        assert answers["yes"] > 0 and answers["no"] > 0


def test_tokenizer_reloads_and_encodes(dataset: tuple[Path, dict], tmp_path: Path) -> None:
    root, _ = dataset
    tok = load_tokenizer(root / "tokenizer")
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    assert image_id not in (None, tok.unk_token_id)
    assert len({tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, image_id}) == 4
    ids = tok.encode("<image>\nWhat colour is the circle?")
    assert ids[0] == image_id and ids.count(image_id) == 1
    assert tok.bos_token_id not in ids and tok.eos_token_id not in ids
    assert tok.encode("x<image>y", add_special_tokens=False).count(image_id) == 1
    text = "What colour is the circle?"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    assert tok.decode(tok.encode("USER: ünïcode ✓\nASSISTANT: 42")) == "USER: ünïcode ✓\nASSISTANT: 42"

    trained = train_tokenizer(["<image>\nWhat colour is the circle?", "red"], tmp_path / "tok", vocab_size=300)
    reloaded = load_tokenizer(tmp_path / "tok")
    for attr in ("pad_token_id", "bos_token_id", "eos_token_id", "unk_token_id"):
        assert getattr(reloaded, attr) == getattr(trained, attr) is not None
    assert reloaded.convert_tokens_to_ids(IMAGE_TOKEN) == trained.convert_tokens_to_ids(IMAGE_TOKEN)
    assert reloaded.encode(text) == trained.encode(text)
    assert reloaded.padding_side == "right"


def test_load_tokenizer_missing_folder(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_tokenizer(missing)


def test_dataset_is_complete(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    out.mkdir()
    assert not dataset_is_complete(out)
    meta = _generate(out)
    assert dataset_is_complete(out)
    (out / meta["val_shards"][0]).unlink()
    assert not dataset_is_complete(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"], "temporary folders must be cleaned up"


def test_refuses_to_overwrite_non_empty_dir(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        _generate(out)
    assert (out / "keep.txt").read_text() == "mine"
    generate_shapes(out, num_train=4, num_val=2, overwrite=True)
    assert dataset_is_complete(out) and not (out / "keep.txt").exists()


def test_meta_lists_shards_on_disk(dataset: tuple[Path, dict]) -> None:
    root, meta = dataset
    on_disk = sorted(str(p.relative_to(root)) for p in root.glob("*/*.tar"))
    assert sorted(meta["train_shards"] + meta["val_shards"]) == on_disk
    assert len(meta["train_shards"]) == math.ceil(NUM_TRAIN / SHARD_SIZE)
    assert len(meta["val_shards"]) == math.ceil(NUM_VAL / SHARD_SIZE)
    assert meta["question_types"] == list(QUESTION_TYPES) and meta["version"] == 1
    assert (meta["num_train"], meta["num_val"], meta["shard_size"]) == (NUM_TRAIN, NUM_VAL, SHARD_SIZE)


def test_multi_question_samples_share_one_image_and_answer_correctly() -> None:
    rng = random.Random(7)
    for _ in range(50):
        _, sample = make_sample(rng, 64, questions=3, describe=True)
        *turns, ask, caption = sample["conversations"]
        assert ask["value"] == "Describe the image." and sample["qtype"] == sample["qtypes"].pop() == "describe"
        named = sorted(caption["value"].split(", "))
        assert named == sorted(f"{o['colour']} {o['shape']}" for o in sample["objects"])
        humans, gpts = turns[0::2], turns[1::2]
        assert 1 <= len(humans) <= 3 and len(humans) == len(sample["qtypes"])
        assert [h["value"].count("<image>") for h in humans] == [1] + [0] * (len(humans) - 1)
        assert len(set(sample["qtypes"])) == len(sample["qtypes"])
        for h, g in zip(humans, gpts, strict=True):
            assert g["value"] == _expected_answer(h["value"].removeprefix("<image>\n"), sample["objects"])


def test_cli_data_shapes_writes_a_dataset_and_refuses_to_clobber(tmp_path: Path, capsys) -> None:
    from skipvision.cli import main

    args = ["data", "shapes", "--out", str(tmp_path / "ds"), "--num-train", "6", "--num-val", "4"]
    assert main([*args, "--shard-size", "4", "--image-size", "32"]) == 0
    assert "wrote 6 train / 4 val samples in 3 shards" in capsys.readouterr().out
    assert dataset_is_complete(tmp_path / "ds")
    assert main(args) == 2
    assert "is not empty; pass overwrite=True" in capsys.readouterr().err


def test_shapes_settings_are_defined_once() -> None:
    """The recipe's data.shapes defaults and the ``data shapes`` command's defaults are ShapesSettings' own."""
    from omegaconf import OmegaConf

    from skipvision.cli import make_parser
    from skipvision.recipe import Recipe

    assert OmegaConf.to_object(OmegaConf.structured(Recipe).data.shapes) == ShapesSettings()
    args = vars(make_parser().parse_args(["data", "shapes", "--out", "x"]))
    assert args == {"command": "data", "data_command": "shapes", "out": "x"}  # the generator fills the rest


def test_settings_mismatch_names_what_differs_and_reads_old_meta_as_defaults() -> None:
    meta = {"num_train": 8, "num_val": 4, "seed": 0, "image_size": 64, "shard_size": 1000}  # before train_questions
    wanted = ShapesSettings(num_train=9, num_val=4)
    assert settings_mismatch(meta, wanted) == {"num_train": (8, 9)}
    assert settings_mismatch(meta, ShapesSettings(num_train=8, num_val=4, train_questions=2)) == {
        "train_questions": (1, 2)
    }
