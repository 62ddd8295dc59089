"""``data.group_by_modality_length`` (skipvision/data/grouping.py, docs/data.md "Grouping by modality and length"):
the stage on hand-made streams, then on a converted LLaVA-format set through the training loader and for each of two
readers (rank 0 and 1 of 2): several rounds (a shuffle buffer smaller than the set), an odd number of samples, as
many batches as without grouping, and every batch of one modality except the one cut from the final leftovers."""

from __future__ import annotations

import json

import pytest
import webdataset as wds
from PIL import Image

from skipvision.data.grouping import GroupByModalityLength, modality
from skipvision.data.llava import ConvertSettings, convert_llava
from skipvision.data.pipeline import Placement, SampleEncoder, ShardPasses, build_pipeline, check_shard
from skipvision.data.tokenizer import IMAGE_TOKEN, TEMPLATE_TEXTS, load_tokenizer, prepare_tokenizer, train_tokenizer
from skipvision.data.views import image_transform
from skipvision.recipe import load_recipe

from .conftest import TINY_RECIPE

N = 45  # odd; every third record is text-only: 30 image samples, 15 text samples
BATCH = 4
BUFFER = 8  # the shuffle buffer, and the samples grouped per round: several rounds over N
SEED = 3


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


def _words(n: int) -> int:
    return 1 + (n * 7) % N  # distinct for n < N (7 and 45 are coprime): the length order is known


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], object]:
    """N records converted into about ten small train shards, and a tokenizer for their text."""
    root = tmp_path_factory.mktemp("grouping")
    (root / "images").mkdir()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(root / "images" / "red.png")
    records = [
        {
            "id": n,
            **({"image": "red.png"} if n % 3 else {}),
            "conversations": [{"from": "human", "value": "word " * _words(n)}, {"from": "gpt", "value": "red"}],
        }
        for n in range(N)
    ]
    (root / "set.json").write_text(json.dumps(records))
    convert_llava(root / "set.json", root / "images", root / "out", ConvertSettings(val_fraction=0.0, shard_bytes=2000))
    urls = [str(p) for p in sorted((root / "out" / "train").glob("*.tar"))]
    assert len(urls) >= 4
    train_tokenizer(["word red", *TEMPLATE_TEXTS], root / "tokenizer", vocab_size=300)
    return urls, prepare_tokenizer(load_tokenizer(root / "tokenizer"))


def _encoder(tokenizer) -> SampleEncoder:
    transform = image_transform((16, 16), (0.0,) * 3, (1.0,) * 3)
    return SampleEncoder(tokenizer, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), 3, transform, 4096)


def _check_grouped(batches: list[list[int]], plain: list[list[int]], samples: list[int]) -> None:
    """``batches`` (record numbers) grouped from ``samples``: as many as ``plain`` (the same samples ungrouped), every
    batch of one modality and sorted by length except the ones cut from the final leftovers (fewer than a batch of
    each modality), and no sample twice."""
    assert len(batches) == len(plain) == len(samples) // BATCH
    images = sum(1 for n in samples if n % 3)
    leftovers = images % BATCH + (len(samples) - images) % BATCH
    whole = (len(samples) - leftovers) // BATCH
    for batch in batches[:whole]:
        assert len({n % 3 != 0 for n in batch}) == 1, batches
        assert [_words(n) for n in batch] == sorted(_words(n) for n in batch)
    flat = [n for batch in batches for n in batch]
    assert len(set(flat)) == len(flat) and set(flat) <= set(samples)
    assert any(len({n % 3 != 0 for n in b}) == 2 for b in plain)  # without grouping, batches mix modalities


def test_the_training_loader_groups_over_several_rounds(converted) -> None:
    urls, tokenizer = converted

    def batches(group: bool) -> list[list[int]]:
        pipeline = build_pipeline(
            urls,
            _encoder(tokenizer),
            batch_size=BATCH,
            pad_id=tokenizer.pad_token_id,
            on_error="raise",
            training=True,
            resampled=False,
            shuffle_buffer=BUFFER,
            seed=SEED,
            group_by_modality_length=group,
        )
        out = []
        for batch in pipeline:
            numbers = [int(key) for key in batch["keys"]]
            assert [bool(n % 3) for n in numbers] == [count > 0 for count in batch["num_images"].tolist()]
            out.append(numbers)
        return out

    _check_grouped(batches(True), batches(False), list(range(N)))


def test_each_of_two_readers_groups_its_own_share(converted) -> None:
    """Rank 0 and rank 1 of 2: each reads its share of the shards (as the loader's ShardPasses deals them) through
    the shuffle and the grouping stage seeded by its placement, then the batcher."""
    urls, _ = converted
    seen: list[int] = []
    for rank in (0, 1):
        placement = Placement(rank, 2)
        stages = [
            ShardPasses(urls, placement, SEED, endless=False),
            wds.map(check_shard),
            wds.tarfile_to_samples(),
            wds.shuffle(BUFFER, initial=BUFFER, seed=SEED),
        ]
        raw = list(wds.DataPipeline(*stages))
        samples = [int(s["__key__"]) for s in raw]
        assert [modality(s) == "image" for s in raw] == [bool(n % 3) for n in samples]

        def batches(stream: list[dict]) -> list[list[int]]:
            batcher = wds.batched(BATCH, collation_fn=list, partial=False)
            return [[int(s["__key__"]) for s in batch] for batch in batcher(iter(stream))]

        grouped = list(GroupByModalityLength(BATCH, BUFFER, SEED, placement)(iter(raw)))
        _check_grouped(batches(grouped), batches(raw), samples)
        seen += samples
    assert len(set(seen)) == len(seen)  # disjoint shares


def test_recipe_accepts_group_by_modality_length() -> None:
    assert load_recipe(TINY_RECIPE).data.group_by_modality_length is False
    assert load_recipe(TINY_RECIPE, ["data.group_by_modality_length=true"]).data.group_by_modality_length is True
