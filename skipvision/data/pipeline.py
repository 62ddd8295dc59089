"""WebDataset pipeline: shards -> decoded, tokenised samples -> batches (docs/design.md "Data").

Training streams resampled shards (an endless stream, seeded per rank and worker, so a restarted job neither
repeats nor skips a fixed stretch of data) or, with ``resampled=False``, shuffled shard epochs split by node and
worker. Validation reads every shard once, split by node and worker.

Bad input never yields a silent wrong result: a corrupt image, a missing field, a placeholder/image mismatch or
a sample over ``max_length`` raises ``DataError`` naming the shard and the sample key. The ``ErrorPolicy``
either re-raises it (``on_error=raise``) or skips the sample and counts it (``on_error=skip``); the count
travels with the next batch as ``data_errors`` so the trainer can log the total.
"""

from __future__ import annotations

import glob
import io
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import braceexpand
import torch
import webdataset as wds
from PIL import Image
from transformers import PreTrainedTokenizerBase

from skipvision.data.chat import encode_conversation
from skipvision.data.collate import collate
from skipvision.errors import SkipvisionError

log = logging.getLogger(__name__)
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")


class DataError(SkipvisionError, RuntimeError):
    """A sample or shard could not be used; the message names the file and the sample."""


class ErrorPolicy:
    """WebDataset exception handler: ``raise`` re-raises, ``skip`` counts the failure and continues."""

    def __init__(self, mode: str) -> None:
        if mode not in ("skip", "raise"):
            raise ValueError(f"on_error must be 'skip' or 'raise', got {mode!r}")
        self.mode = mode
        self.count = 0
        self._reported = 0

    def __call__(self, exn: Exception) -> bool:
        if self.mode == "raise":
            raise exn
        self.count += 1
        if self.count <= 5:
            log.warning("skipping bad data (%d so far): %s", self.count, exn)
        return True

    def take_new(self) -> int:
        """Failures since the previous call (reported once with a batch)."""
        new, self._reported = self.count - self._reported, self.count
        return new


class SampleEncoder:
    """Raw WebDataset sample (``json`` + image fields) -> tokenised sample with image tensors.

    The json holds LLaVA-style ``conversations`` (and optionally ``qtype``); image fields are those with an image
    extension, in field-name order, so a sample can hold zero, one or several images.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        image_token_id: int,
        num_image_tokens: int,
        transform: Callable[[Image.Image], torch.Tensor],
        max_length: int,
        with_prompt: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
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
        image_keys = sorted(k for k in sample if k.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS)
        images = [self.transform(_decode_image(sample[k])) for k in image_keys]
        enc = encode_conversation(
            self.tokenizer, meta["conversations"], self.num_image_tokens, len(images), self.image_token_id
        )
        if len(enc.input_ids) > self.max_length:
            raise ValueError(f"{len(enc.input_ids)} tokens, over data.max_length={self.max_length}")
        out = {
            "key": sample.get("__key__", ""),
            "input_ids": enc.input_ids,
            "labels": enc.labels,
            "images": images,
            "answer": enc.answer,
            "qtype": meta.get("qtype", "all"),
        }
        if self.with_prompt:
            out["prompt_ids"] = enc.input_ids[: enc.prompt_length]
        return out


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
) -> wds.DataPipeline:
    """The full shard -> batch pipeline; iterate it through a DataLoader with ``batch_size=None``."""
    policy = ErrorPolicy(on_error)
    if training and resampled:
        stages: list[Any] = [wds.ResampledShards(urls, seed=seed, deterministic=True)]
    else:
        stages = [wds.SimpleShardList(urls)]
        if training:
            stages.append(wds.detshuffle(bufsize=len(urls), seed=seed))
        stages += [wds.split_by_node, wds.split_by_worker]
    stages.append(wds.tarfile_to_samples(handler=policy))
    if training:
        stages.append(wds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, 100), seed=seed))
    stages += [
        wds.map(encoder, handler=policy),
        wds.batched(batch_size, collation_fn=Collator(pad_id, policy), partial=not training),
    ]
    return wds.DataPipeline(*stages)
