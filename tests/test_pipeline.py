"""Chat encoding, the WebDataset pipeline and its bad-input policy (skip and count, or fail naming the file)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
import webdataset as wds
from PIL import Image

from skipvision.data.chat import IGNORE_INDEX, ConversationError, encode_conversation, encode_prompt
from skipvision.data.pipeline import DataError, Placement, SampleEncoder, build_pipeline, expand_shards
from skipvision.data.tokenizer import IMAGE_TOKEN, load_tokenizer
from skipvision.data.views import image_transform

N_SLOTS = 5


@pytest.fixture(scope="module")
def tokenizer(tiny_shapes: Path):
    return load_tokenizer(tiny_shapes / "tokenizer")


def _png(colour: tuple[int, int, int] = (200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), colour).save(buf, format="PNG")
    return buf.getvalue()


def _conv(q: str = "<image>\nWhat colour is the circle?", a: str = "red") -> bytes:
    return json.dumps(
        {"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}], "qtype": "colour"}
    ).encode()


def _write_shard(path: Path, samples: list[dict]) -> str:
    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)
    return str(path)


def _encoder(tokenizer, max_length: int = 64) -> SampleEncoder:
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    return SampleEncoder(
        tokenizer, image_id, N_SLOTS, image_transform((16, 16), (0.5,) * 3, (0.5,) * 3), max_length, with_prompt=True
    )


def _pipeline(tokenizer, urls: list[str], max_length: int = 64, **options):
    """The real pipeline with test defaults: batches of 2, fail on bad input, validation mode."""
    kwargs = {"batch_size": 2, "on_error": "raise", "training": False, **options}
    return build_pipeline(urls, _encoder(tokenizer, max_length), pad_id=tokenizer.pad_token_id, **kwargs)


def test_chat_expands_images_and_labels_only_answers(tokenizer) -> None:
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    conv = json.loads(_conv())["conversations"] + json.loads(_conv(q="And the square?", a="blue"))["conversations"]
    enc = encode_conversation(tokenizer, conv, N_SLOTS, 1, image_id)
    assert enc.input_ids[0] == tokenizer.bos_token_id
    assert enc.input_ids.count(image_id) == N_SLOTS
    labelled = [t for t, lab in zip(enc.input_ids, enc.labels, strict=True) if lab != IGNORE_INDEX]
    assert tokenizer.decode(labelled) == " red</s> blue</s>"
    assert enc.answer == "blue"
    assert tokenizer.decode(enc.input_ids[: enc.prompt_length]).endswith("USER: And the square?\nASSISTANT:")
    prompt = encode_prompt(tokenizer, "What colour is the circle?", N_SLOTS, 1, image_id)
    first_round = encode_conversation(tokenizer, conv[:2], N_SLOTS, 1, image_id)
    assert prompt == first_round.input_ids[: first_round.prompt_length]  # generation prompt == training prefix


def test_chat_rejects_placeholder_image_mismatch(tokenizer) -> None:
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    conv = json.loads(_conv())["conversations"]
    with pytest.raises(
        ConversationError, match=r"conversation has 1 <image> placeholder\(s\) but 2 image\(s\) were given"
    ):
        encode_conversation(tokenizer, conv, N_SLOTS, 2, image_id)
    with pytest.raises(ConversationError, match="alternating"):
        encode_conversation(tokenizer, conv[:1], N_SLOTS, 1, image_id)
    with pytest.raises(ConversationError, match=r"2 <image> placeholder\(s\) but 1 image"):
        encode_prompt(tokenizer, "<image><image> hi", N_SLOTS, 1, image_id)


def _mixed_shard(tmp_path: Path) -> str:
    """6 samples: 3 good, 1 corrupt image, 1 without json, 1 with a placeholder but no image."""
    return _write_shard(
        tmp_path / "mixed-000000.tar",
        [
            {"__key__": "good0", "png": _png(), "json": _conv()},
            {"__key__": "corrupt", "png": b"not a png at all", "json": _conv()},
            {"__key__": "good1", "png": _png((0, 0, 200)), "json": _conv(a="blue")},
            {"__key__": "nojson", "png": _png()},
            {"__key__": "noimage", "json": _conv()},
            {"__key__": "good2", "json": _conv(q="Is a square round?", a="no")},
        ],
    )


def test_skip_policy_skips_and_counts_bad_samples(tokenizer, tmp_path: Path) -> None:
    url = _mixed_shard(tmp_path)
    training = list(_pipeline(tokenizer, [url], on_error="skip", training=True, resampled=False, shuffle_buffer=1))
    assert [k for b in training for k in b["keys"]] == ["good0", "good1"]  # full batches only; good2 left over
    assert sum(b["data_errors"] for b in training) == 3
    assert training[0]["pixel_values"].shape == (2, 3, 16, 16)

    # Validation keeps every position: a bad sample becomes a filler (no labels, no image), so shares stay even.
    batches = list(_pipeline(tokenizer, [url], on_error="skip"))
    assert [k for b in batches for k in b["keys"]] == ["good0", "", "good1", "", "", "good2"]
    assert [f for b in batches for f in b["fillers"]] == [False, True, False, True, True, False]
    assert sum(b["data_errors"] for b in batches) == 3
    assert batches[0]["pixel_values"].shape == (1, 3, 16, 16) and batches[0]["num_images"].tolist() == [1, 0]
    assert (batches[0]["labels"][1] == IGNORE_INDEX).all()
    assert batches[2]["num_images"].tolist() == [0, 0] and "pixel_values" not in batches[2]
    assert batches[0]["prompt_ids"].shape[0] == 2 and batches[1]["answers"] == ["blue", ""]


def test_raise_policy_names_the_shard_and_sample(tokenizer, tmp_path: Path) -> None:
    url = _mixed_shard(tmp_path)
    with pytest.raises(DataError, match=r"mixed-000000.tar: sample corrupt: UnidentifiedImageError"):
        list(_pipeline(tokenizer, [url]))


def test_over_length_sample_is_an_error_not_a_truncation(tokenizer, tmp_path: Path) -> None:
    url = _write_shard(tmp_path / "long-000000.tar", [{"__key__": "long", "png": _png(), "json": _conv()}])
    with pytest.raises(DataError, match=r"sample long: ValueError: \d+ tokens, over data.max_length=8"):
        list(_pipeline(tokenizer, [url], max_length=8))


def test_missing_shards_fail_with_the_file_name_or_are_dropped(tmp_path: Path) -> None:
    good = _write_shard(tmp_path / "a-000000.tar", [{"__key__": "x", "json": _conv()}])
    missing = str(tmp_path / "a-000001.tar")
    with pytest.raises(DataError, match="shard file\\(s\\) not found: .*a-000001.tar"):
        expand_shards([good, missing], on_error="raise")
    assert expand_shards([good, missing], on_error="skip") == [good]
    assert expand_shards(str(tmp_path / "a-00000{0..1}.tar"), on_error="skip") == [good]
    assert expand_shards(str(tmp_path / "*.tar")) == [good]
    with pytest.raises(DataError, match="no shards match"):
        expand_shards(str(tmp_path / "none-*.tar"))


def test_training_stream_is_seeded_and_splits_across_workers(tokenizer, tiny_shapes: Path) -> None:
    urls = expand_shards(str(tiny_shapes / "train" / "*.tar"))
    assert len(urls) == 2

    all_keys = sorted(f"train-{i:07d}" for i in range(64))

    def pipe(seed: int, resampled: bool):
        return _pipeline(
            tokenizer, urls, 200, batch_size=4, training=True, resampled=resampled, shuffle_buffer=8, seed=seed
        )

    def stream(seed: int) -> list[str]:
        it = iter(pipe(seed, resampled=True))
        return [k for _ in range(20) for k in next(it)["keys"]]  # endless: more than one pass of 64

    assert stream(0) == stream(0)
    assert stream(0) != stream(1)
    epoch = [k for b in pipe(0, resampled=False) for k in b["keys"]]
    assert sorted(epoch) == all_keys and epoch != all_keys  # one shuffled pass, every sample once

    loader = torch.utils.data.DataLoader(
        _pipeline(tokenizer, urls, 200, batch_size=8),
        batch_size=None,
        num_workers=2,
    )
    seen = [k for b in loader for k in b["keys"]]
    assert sorted(seen) == all_keys  # each shard read by exactly one worker


def _readers(world: int, workers: int, make) -> list[list[dict]]:
    """Every rank's batches for ``world`` ranks with ``workers`` DataLoader workers each."""
    out = []
    for rank in range(world):
        loader = torch.utils.data.DataLoader(make(Placement(rank, world)), batch_size=None, num_workers=workers)
        out.append(list(loader))
    return out


@pytest.mark.parametrize(("world", "workers"), [(2, 1), (2, 2), (3, 2)])
def test_validation_gives_every_rank_the_same_batches_and_every_sample_once(
    tokenizer, tmp_path: Path, world: int, workers: int
) -> None:
    """docs/distributed.md "Data": one shard of 5 samples for up to 6 readers; each rank gets the same number of
    batches, fillers pad the shares, and the real samples are each read exactly once."""
    keys = [f"s{i}" for i in range(5)]
    url = _write_shard(tmp_path / "v-000000.tar", [{"__key__": k, "json": _conv("Is it?", "yes")} for k in keys])
    ranks = _readers(world, workers, lambda placement: _pipeline(tokenizer, [url], placement=placement))
    assert len({len(batches) for batches in ranks}) == 1
    assert len({sum(len(b["keys"]) for b in batches) for batches in ranks}) == 1
    real = [k for batches in ranks for b in batches for k, f in zip(b["keys"], b["fillers"], strict=True) if not f]
    assert sorted(real) == keys
    fillers = [f for batches in ranks for b in batches for f in b["fillers"] if f]
    assert len(fillers) == -(-5 // (world * workers)) * world * workers - 5


def _passes(tokenizer, urls: list[str], **options):
    """Training without resampling, batches of 4 in shard order (no sample shuffle)."""
    return _pipeline(tokenizer, urls, 200, batch_size=4, training=True, resampled=False, shuffle_buffer=1, **options)


def test_training_without_resampling_splits_shards_evenly_or_refuses(tokenizer, tiny_shapes: Path) -> None:
    urls = expand_shards(str(tiny_shapes / "train" / "*.tar"))  # 2 shards of 32 samples

    def make(epoch_batches: int | None, workers: int = 1):
        def pipeline(placement: Placement):
            return _passes(tokenizer, urls, placement=placement, epoch_batches=epoch_batches)

        return _readers(2, workers, pipeline)

    with pytest.raises(DataError, match=r"data.resampled=false on several ranks needs data.epoch_batches"):
        make(None)
    ranks = make(epoch_batches=10)
    assert [len(batches) for batches in ranks] == [10, 10]  # 10 batches of 4 from a 32-sample shard: a second pass
    shards = [{f"train-{i:07d}" for i in range(32)}, {f"train-{i:07d}" for i in range(32, 64)}]
    passes = [{k for b in batches[:8] for k in b["keys"]} for batches in ranks]  # each rank's first pass
    assert sorted(passes, key=min) == shards  # one whole shard each, never the same one
    with pytest.raises(DataError, match=r"2 training shard\(s\) for 4 readers"):
        make(epoch_batches=4, workers=2)


def test_a_resumed_run_draws_a_fresh_training_stream(tokenizer, tiny_shapes: Path) -> None:
    urls = expand_shards(str(tiny_shapes / "train" / "*.tar"))

    def first_keys(start_step: int, rank: int = 0) -> list[str]:
        pipe = _pipeline(
            tokenizer,
            urls,
            200,
            batch_size=4,
            training=True,
            shuffle_buffer=8,
            start_step=start_step,
            placement=Placement(rank, 2),
        )
        it = iter(pipe)
        return [k for _ in range(4) for k in next(it)["keys"]]

    assert first_keys(0) == first_keys(0)
    assert first_keys(0) != first_keys(5)  # resumed at step 5: not a replay of the first steps
    assert first_keys(0, rank=0) != first_keys(0, rank=1)  # ranks draw different streams


def test_epochs_continue_one_stream_and_a_resumed_epoch_is_shorter(tokenizer, tiny_shapes: Path) -> None:
    """docs/distributed.md "Data": epochs of ``epoch_batches`` cut one stream that goes on across epochs (no shard
    restarts at an epoch boundary), and a run resumed after 1 batch of an epoch finishes that epoch with 1 batch."""
    urls = expand_shards(str(tiny_shapes / "train" / "*.tar"))  # 2 shards of 32 samples

    def pipe(start_batch: int = 0):
        return _passes(tokenizer, urls, epoch_batches=2, start_batch=start_batch)

    for workers in (0, 2):
        loader = torch.utils.data.DataLoader(
            pipe(), batch_size=None, num_workers=workers, persistent_workers=workers > 0
        )
        epochs = [[k for b in loader for k in b["keys"]] for _ in range(6)]
        assert [len(e) for e in epochs] == [8] * 6
        assert len({k for e in epochs for k in e}) == 48  # 6 epochs x 8 samples of one 64-sample pass, none twice
    resumed = pipe(start_batch=1)
    assert [len(list(resumed)) for _ in range(3)] == [1, 2, 2]


@pytest.mark.parametrize("cut", ["member_boundary", "mid_member"])
def test_a_truncated_shard_is_one_counted_error_or_one_fatal_line(tokenizer, tmp_path: Path, cut: str) -> None:
    """docs/runs.md "Bad data": a shard cut short, wherever, is skipped whole and counted once, or stops the run
    naming it; the intact shard is read in full."""
    text = _conv(q="Is a square round?", a="no")
    good = _write_shard(tmp_path / "ok-000000.tar", [{"__key__": f"g{i}", "json": text} for i in range(3)])
    whole = _write_shard(tmp_path / "cut-000001.tar", [{"__key__": f"c{i}", "json": text} for i in range(3)])
    with tarfile.open(whole) as tar:
        second = tar.getmembers()[1]  # the first sample is one member (json); the cut falls after or inside it
    data = Path(whole).read_bytes()
    end = second.offset if cut == "member_boundary" else second.offset_data + 3
    Path(whole).write_bytes(data[:end])
    batches = list(_pipeline(tokenizer, [good, whole], on_error="skip"))
    assert [k for b in batches for k, f in zip(b["keys"], b["fillers"], strict=True) if not f] == ["g0", "g1", "g2"]
    assert sum(b["data_errors"] for b in batches) == 1
    with pytest.raises(DataError, match=rf"cut-000001.tar: truncated tar shard \({end} bytes, no end-of-archive"):
        list(_pipeline(tokenizer, [good, whole], on_error="raise"))
