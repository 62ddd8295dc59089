"""WebDataset pipeline: shards -> decoded, tokenised samples -> batches (docs/distributed.md "Data").

Every rank and DataLoader worker is one *reader*; the :class:`Placement` (rank, world) comes from the trainer, the
worker from PyTorch. Readers must agree on the number of batches, or distributed ranks end up in different
collectives and hang (docs/distributed.md "Data"):

- Training streams resampled shards (endless, seeded per reader and by the step the run starts at, so a resumed run
  draws a fresh stream) or, with ``resampled=False``, shuffled passes over shards split evenly between the readers
  (each pass gives every reader the same number of shards). ``epoch_batches`` cuts the stream into Lightning epochs
  of that many batches per rank; several readers without resampling need it, since shards differ in length.
- Validation reads every sample once: each reader reads all shards but decodes only every (readers)-th sample, and
  pads its share with filler samples up to the largest share, so every rank runs the same number of validation
  steps however few shards there are. Fillers are one-token text-only samples marked ``filler``; they carry no
  labels and are left out of the metrics.

Bad input never yields a silent wrong result: a corrupt image, a missing field, a placeholder/image mismatch or
a sample over ``max_length`` raises ``DataError`` naming the shard and the sample key. The ``ErrorPolicy``
either re-raises it (``on_error=raise``) or skips the sample and counts it (``on_error=skip``); the count
travels with the next batch as ``data_errors`` so the trainer can log the total.
"""

from __future__ import annotations

import glob
import io
import itertools
import json
import logging
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import braceexpand
import torch
import webdataset as wds
from PIL import Image
from transformers import PreTrainedTokenizerBase

from skipvision.data.chat import IGNORE_INDEX, encode_conversation
from skipvision.data.collate import collate
from skipvision.data.samples import image_keys
from skipvision.errors import DataError

log = logging.getLogger(__name__)


class ErrorPolicy:
    """WebDataset exception handler: ``raise`` re-raises, ``skip`` counts the failure and continues, unless
    ``max_in_a_row`` failures come without a batch in between: then nothing valid is coming (every sample over
    ``max_length``, a wrong data root...) and the stream stops with a :class:`DataError` naming the last failure,
    instead of skipping forever (docs/runs.md "Bad data")."""

    def __init__(self, mode: str, max_in_a_row: int = 1000) -> None:
        if mode not in ("skip", "raise"):
            raise ValueError(f"on_error must be 'skip' or 'raise', got {mode!r}")
        self.mode = mode
        self.max_in_a_row = max_in_a_row
        self.count = 0
        self._reported = 0

    def __call__(self, exn: Exception) -> bool:
        if self.mode == "raise":
            raise exn
        self.count += 1
        if self.count <= 5:
            log.warning("skipping bad data (%d so far): %s", self.count, exn)
        if self.count - self._reported >= self.max_in_a_row:
            raise DataError(
                f"no valid sample in the last {self.max_in_a_row} read (data.max_errors_in_a_row); the last "
                f"error: {exn}"
            )
        return True

    def take_new(self) -> int:
        """Failures since the previous call (reported once with a batch)."""
        new, self._reported = self.count - self._reported, self.count
        return new


class SampleEncoder:
    """Raw WebDataset sample (``json`` + image fields) -> tokenised sample with image tensors.

    The json holds LLaVA-style ``conversations`` (and optionally ``qtype``, and ``system``, which replaces the
    recipe's system prompt); image fields are those with an image extension, in field-name order, so a sample can
    hold zero, one or several images.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        image_token_id: int,
        num_image_tokens: int,
        transform: Callable[[Image.Image], torch.Tensor],
        max_length: int,
        with_prompt: bool = False,
        system: str | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.system = system
        self.image_token_id = image_token_id
        self.num_image_tokens = num_image_tokens
        self.transform = transform
        self.max_length = max_length
        self.with_prompt = with_prompt

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        where = f"{sample.get('__url__', '?')}: sample {sample.get('__key__', '?')}"
        try:
            return self._encode(sample)
        except Exception as err:
            raise DataError(f"{where}: {type(err).__name__}: {err}") from err

    def _encode(self, sample: dict[str, Any]) -> dict[str, Any]:
        if "json" not in sample:
            raise KeyError(f"no 'json' field (fields: {sorted(k for k in sample if not k.startswith('__'))})")
        meta = json.loads(sample["json"])
        images = [self.transform(_decode_image(sample[k])) for k in image_keys(sample)]
        system = meta.get("system", self.system)  # a sample's own system turn (data llava keeps it) wins
        enc = encode_conversation(
            self.tokenizer, meta["conversations"], self.num_image_tokens, len(images), self.image_token_id, system
        )
        if len(enc.input_ids) > self.max_length:
            raise ValueError(f"{len(enc.input_ids)} tokens, over data.max_length={self.max_length}")
        qtype = meta.get("qtype", "all")
        out = {
            "key": sample.get("__key__", ""),
            "input_ids": enc.input_ids,
            "labels": enc.labels,
            "images": images,
            "answer": enc.answer,
            "qtype": qtype,
        }
        if self.with_prompt:
            out["prompt_ids"] = enc.input_ids[: enc.prompt_length]
        return out

    def filler(self) -> dict[str, Any]:
        """A one-token text-only sample with no labels that pads a reader's share of validation (module docstring)."""
        token = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        out = {"key": "", "input_ids": [token], "labels": [IGNORE_INDEX], "images": [], "answer": "", "qtype": ""}
        if self.with_prompt:
            out["prompt_ids"] = [token]
        return {**out, "filler": True}


def _decode_image(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as img:
        return img.convert("RGB")


class Collator:
    """Batch collation that also reports the samples this worker skipped since its previous batch."""

    def __init__(self, pad_id: int, policy: ErrorPolicy) -> None:
        self.pad_id = pad_id
        self.policy = policy

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        return collate(samples, self.pad_id, self.policy.take_new())


def expand_shards(pattern: str | list[str], on_error: str = "raise") -> list[str]:
    """Shard paths from a brace pattern, a glob or a list; missing local files fail (or are dropped)."""
    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    urls: list[str] = []
    for pat in patterns:
        for item in braceexpand.braceexpand(pat):
            matched = sorted(glob.glob(item)) if glob.has_magic(item) else [item]
            urls += matched
    missing = [u for u in urls if "://" not in u and not Path(u).is_file()]
    if missing and on_error == "raise":
        raise DataError(f"shard file(s) not found: {', '.join(missing)}")
    if missing:
        log.warning("dropping %d missing shard(s): %s", len(missing), ", ".join(missing))
    urls = [u for u in urls if u not in missing]
    if not urls:
        raise DataError(f"no shards match {pattern!r}")
    return urls


TAR_BLOCK = 512


def check_shard(shard: dict[str, str]) -> dict[str, str]:
    """A local shard must end with tar's end-of-archive marker (two zero blocks): a file cut short, even exactly at
    a member boundary, has none. Python's tarfile would read the members before the cut and stop silently; here the
    whole shard is one data error instead (skipped and counted once, or fatal), before any of it is read."""
    url = shard["url"]
    path = Path(url)
    if "://" in url or not path.is_file():
        return shard
    size = path.stat().st_size
    with open(path, "rb") as f:
        f.seek(max(0, size - 2 * TAR_BLOCK))
        tail = f.read()
    if size % TAR_BLOCK or len(tail) < 2 * TAR_BLOCK or any(tail):
        raise DataError(f"{url}: truncated tar shard ({size} bytes, no end-of-archive marker)")
    return shard


class Placement(NamedTuple):
    """The process a loader runs in: ``rank`` of ``world`` (the trainer's global rank and world size)."""

    rank: int = 0
    world: int = 1


def worker_slot() -> tuple[int, int]:
    """(this DataLoader worker's index, the number of workers); (0, 1) in the main process."""
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def reader_slot(placement: Placement) -> tuple[int, int]:
    """(this reader's index, the number of readers): one reader per rank and DataLoader worker."""
    worker, workers = worker_slot()
    return placement.rank * workers + worker, placement.world * workers


class ReaderSeed:
    """``ResampledShards``' per-reader seed, from the trainer's rank rather than whatever torch.distributed says."""

    def __init__(self, placement: Placement) -> None:
        self.placement = placement

    def __call__(self) -> int:
        return wds.utils.make_seed(*reader_slot(self.placement))


class ShardPasses(torch.utils.data.IterableDataset):
    """Training without resampling: shuffled passes over the shards, each reader taking the same number of shards
    per pass (the shuffled remainder sits out that pass). One pass per iteration, or endless passes with
    ``endless`` (the stream is then cut by :class:`EpochLength`); every iteration starts a new shuffle."""

    def __init__(self, urls: list[str], placement: Placement, seed: int, endless: bool) -> None:
        super().__init__()
        self.urls, self.placement, self.seed, self.endless = list(urls), placement, seed, endless
        self.epoch = -1

    def __iter__(self) -> Iterator[dict[str, str]]:
        self.epoch += 1
        slot, slots = reader_slot(self.placement)
        share = len(self.urls) // slots
        if share == 0:
            raise DataError(
                f"{len(self.urls)} training shard(s) for {slots} readers (ranks x data.num_workers) with "
                "data.resampled=false: every reader needs a shard; use more shards, fewer workers, or "
                "data.resampled=true"
            )
        for turn in itertools.count() if self.endless else range(1):
            order = list(self.urls)
            random.Random(wds.utils.make_seed(self.seed, self.epoch, turn)).shuffle(order)
            for url in order[slot * share : (slot + 1) * share]:
                yield {"url": url}


class EvenSplit:
    """Validation: this reader's share of the samples, decoded, padded with fillers to the largest share.

    Every reader sees every raw sample (in shard order) and decodes those whose index falls on its slot, so shares
    differ by at most one whatever the shard count; at the end all readers know the total and pad to the same count.
    A sample that fails to decode under ``on_error=skip`` becomes a filler (and is counted), never a gap.
    """

    def __init__(self, encoder: SampleEncoder, policy: ErrorPolicy, placement: Placement) -> None:
        self.encoder, self.policy, self.placement = encoder, policy, placement

    def __call__(self, samples: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        slot, slots = reader_slot(self.placement)
        seen = mine = 0
        for index, sample in enumerate(samples):
            seen = index + 1
            if index % slots != slot:
                continue
            mine += 1
            try:
                yield self.encoder(sample)
            except DataError as err:
                self.policy(err)  # re-raises under on_error=raise
                yield self.encoder.filler()
        for _ in range(-(-seen // slots) - mine):
            yield self.encoder.filler()


class Epochs(torch.utils.data.IterableDataset):
    """One endless stream of batches cut into epochs of ``batches`` per rank, shared out between the workers.

    The stream lives on across epochs (in the main process, or in each persistent DataLoader worker), so every epoch
    takes up where the previous one stopped: no shard is restarted from its first sample at an epoch boundary. A run
    resumed mid-epoch has done ``done`` batches of its current epoch already; its first epoch is that much shorter,
    so the epochs stay aligned with the step count.
    """

    def __init__(self, stream: wds.DataPipeline, batches: int, done: int = 0) -> None:
        super().__init__()
        self.stream, self.batches, self.done = stream, batches, done
        self._batches: Iterator[dict[str, Any]] | None = None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, workers = worker_slot()
        if self._batches is None:
            self._batches = iter(self.stream)
        left, self.done = self.batches - self.done, 0
        yield from itertools.islice(self._batches, left // workers + (worker < left % workers))


def build_pipeline(
    urls: list[str],
    encoder: SampleEncoder,
    *,
    batch_size: int,
    pad_id: int,
    on_error: str,
    training: bool,
    resampled: bool = True,
    shuffle_buffer: int = 1000,
    seed: int = 0,
    placement: Placement | None = None,
    epoch_batches: int | None = None,
    start_step: int = 0,
    start_batch: int = 0,
    max_errors_in_a_row: int = 1000,
    group_by_modality_length: bool = False,
) -> wds.DataPipeline | Epochs:
    """The full shard -> batch pipeline; iterate it through a DataLoader with ``batch_size=None``.

    ``group_by_modality_length`` reorders the training stream, ``shuffle_buffer`` samples at a time, into batches
    of one modality and similar lengths (skipvision/data/grouping.py).

    ``start_step`` (the global step a resumed run starts at) reseeds the training stream, so a resumed run does not
    replay the samples of its first steps (module docstring); ``start_batch`` is the batches of the current epoch
    it has done (see :class:`Epochs`).
    """
    placement = placement or Placement()
    policy = ErrorPolicy(on_error, max_errors_in_a_row)
    collation = Collator(pad_id, policy)
    if not training:
        return wds.DataPipeline(
            wds.SimpleShardList(urls),
            wds.map(check_shard, handler=policy),
            wds.tarfile_to_samples(handler=policy),
            EvenSplit(encoder, policy, placement),
            wds.batched(batch_size, collation_fn=collation, partial=True),
        )
    stream_seed = wds.utils.make_seed(seed, start_step)
    if resampled:
        shards: Any = wds.ResampledShards(urls, seed=stream_seed, worker_seed=ReaderSeed(placement), deterministic=True)
    else:
        if epoch_batches is None and placement.world > 1:
            raise DataError(
                "data.resampled=false on several ranks needs data.epoch_batches (batches per rank per epoch): "
                "shards differ in length, so ranks would end their epochs at different steps"
            )
        shards = ShardPasses(urls, placement, stream_seed, endless=epoch_batches is not None)
    grouping = []
    if group_by_modality_length:
        from skipvision.data.grouping import GroupByModalityLength  # it imports this module

        grouping.append(GroupByModalityLength(batch_size, shuffle_buffer, stream_seed, placement))
    stages: list[Any] = [
        shards,
        wds.map(check_shard, handler=policy),
        wds.tarfile_to_samples(handler=policy),
        wds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, 100), seed=stream_seed),
        *grouping,
        wds.map(encoder, handler=policy),
        wds.batched(batch_size, collation_fn=collation, partial=False),
    ]
    stream = wds.DataPipeline(*stages)
    return stream if epoch_batches is None else Epochs(stream, epoch_batches, start_batch)
