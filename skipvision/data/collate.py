"""Batching of tokenised samples: padding, -100 labels, images stacked across the batch.

A batch holds (B samples, M images in total, T tokens, P prompt tokens)::

    input_ids      [B, T]  right-padded with the pad id
    labels         [B, T]  -100 on prompt, image slots and padding
    attention_mask [B, T]
    pixel_values   [M, 3, H, W] images of all samples in sample order (absent when M == 0);
                   [M, V, 3, H, W] with V views per image (thumbnail + tiles)
    num_images     [B]     images per sample, so the model can check every sample's slot count
    prompt_ids     [B, P]  left-padded generation prompts (validation only), with prompt_mask [B, P]
    answers, qtypes, keys  lists of strings
    fillers        list of bools: True for the text-only padding samples of validation (pipeline.EvenSplit)
    data_errors    int     samples skipped by this worker since its previous batch (see pipeline.ErrorPolicy)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from skipvision.data.chat import IGNORE_INDEX


def pad_sequences(seqs: Sequence[Sequence[int]], value: int, left: bool = False) -> torch.Tensor:
    """Stack integer lists into [len(seqs), max_len], padding on the right (or left) with ``value``."""
    width = max((len(s) for s in seqs), default=0)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for row, seq in enumerate(seqs):
        if len(seq):
            span = slice(width - len(seq), width) if left else slice(0, len(seq))
            out[row, span] = torch.as_tensor(seq, dtype=torch.long)
    return out


def collate(samples: Sequence[dict[str, Any]], pad_id: int, data_errors: int = 0) -> dict[str, Any]:
    """Collate samples produced by ``pipeline.SampleEncoder`` into one batch."""
    input_ids = pad_sequences([s["input_ids"] for s in samples], pad_id)  # [B, T]
    lengths = torch.tensor([len(s["input_ids"]) for s in samples])
    batch: dict[str, Any] = {
        "input_ids": input_ids,
        "labels": pad_sequences([s["labels"] for s in samples], IGNORE_INDEX),  # [B, T]
        "attention_mask": (torch.arange(input_ids.shape[1])[None] < lengths[:, None]).long(),  # [B, T]
        "num_images": torch.tensor([len(s["images"]) for s in samples], dtype=torch.long),  # [B]
        "answers": [s["answer"] for s in samples],
        "qtypes": [s["qtype"] for s in samples],
        "keys": [s["key"] for s in samples],
        "fillers": [bool(s.get("filler", False)) for s in samples],
        "data_errors": data_errors,
    }
    images = [img for s in samples for img in s["images"]]
    if images:
        batch["pixel_values"] = torch.stack(images)  # [M, 3, H, W] or [M, V, 3, H, W]
    if "prompt_ids" in samples[0]:
        prompts = [s["prompt_ids"] for s in samples]
        batch["prompt_ids"] = pad_sequences(prompts, pad_id, left=True)  # [B, P]
        batch["prompt_mask"] = pad_sequences([[1] * len(p) for p in prompts], 0, left=True)  # [B, P]
    return batch
