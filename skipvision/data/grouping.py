"""``data.group_by_modality_length``: training batches of one modality and similar lengths, LLaVA's
``group_by_modality_length`` for a stream (docs/data.md "Grouping by modality and length").

LLaVA sorts megabatches of dataset indices by length before loading; a WebDataset stream has no index, so this
stage reorders raw samples (before decoding: the buffer holds compressed bytes, not image tensors) for the batcher
that cuts them into batches. It only reorders: every sample read comes out once, so a reader yields as many batches
as without grouping and the ranks stay in step (docs/distributed.md "Data").
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from typing import Any

import webdataset as wds

from skipvision.data.pipeline import Placement, reader_slot
from skipvision.data.samples import image_keys

Sample = dict[str, Any]


def modality(sample: Sample) -> str:
    """``image`` when the raw sample has an image member (the encoder's own test), else ``text``."""
    return "image" if image_keys(sample) else "text"


def sort_length(sample: Sample) -> int:
    """The length grouped by: the json's ``num_tokens`` (``data llava --tokenizer`` stores it), else its ``length``
    (words; always stored by ``data llava``), else the words of its turns; 0 when the json is unreadable (the
    encoder then reports the sample)."""
    try:
        meta = json.loads(sample["json"])
        if "num_tokens" in meta or "length" in meta:
            return int(meta.get("num_tokens", meta.get("length")))
        return sum(len(turn["value"].split()) for turn in meta["conversations"])
    except (KeyError, TypeError, ValueError, AttributeError):
        return 0


class GroupByModalityLength:
    """Reorders a sample stream so that every ``batch_size`` consecutive samples share a modality and have
    neighbouring lengths.

    Samples collect in one pool per modality. Whenever ``buffer`` samples are held, each pool is cut into batches:
    all but its most recent ``len % batch_size`` samples (kept for the next round, so none waits more than one
    round) are sorted by :func:`sort_length` and chunked; the batches of both pools then come out in a shuffled
    order, so a run sees no short-to-long curriculum. At the end of the stream the pools are emptied the same way,
    and the leftovers of both, fewer than a batch each, come last, sorted by length together: the one place a batch
    can mix modalities, as in LLaVA. The shuffle is seeded by ``seed`` and the reader (rank and worker), so every
    run with the same seed groups the same way.
    """

    def __init__(self, batch_size: int, buffer: int, seed: int, placement: Placement | None = None) -> None:
        self.batch_size, self.buffer, self.seed = batch_size, max(buffer, batch_size), seed
        self.placement = placement or Placement()

    def __call__(self, samples: Iterator[Sample]) -> Iterator[Sample]:
        rng = random.Random(wds.utils.make_seed(self.seed, reader_slot(self.placement)[0]))
        pools: dict[str, list[Sample]] = {"image": [], "text": []}
        held = 0
        for sample in samples:
            pools[modality(sample)].append(sample)
            held += 1
            if held >= self.buffer:
                yield from self._release(pools, rng)
                held = sum(map(len, pools.values()))
        yield from self._release(pools, rng)
        yield from sorted(pools["image"] + pools["text"], key=sort_length)

    def _release(self, pools: dict[str, list[Sample]], rng: random.Random) -> Iterator[Sample]:
        batches = []
        for name, pool in pools.items():
            ready = len(pool) - len(pool) % self.batch_size
            ordered = sorted(pool[:ready], key=sort_length)
            batches += [ordered[i : i + self.batch_size] for i in range(0, ready, self.batch_size)]
            pools[name] = pool[ready:]
        rng.shuffle(batches)
        for batch in batches:
            yield from batch
