"""LightningDataModule over WebDataset shards (docs/distributed.md "Data": readers, even validation, epochs).

The loaders are built when Lightning asks for them, after the trainer has set up the processes and restored any
checkpoint, so each knows its rank in the world (:class:`~skipvision.data.pipeline.Placement`) and the step a
resumed run starts at.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
from omegaconf import DictConfig
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from skipvision.data.pipeline import Placement, SampleEncoder, build_pipeline, expand_shards
from skipvision.data.tokenizer import IMAGE_TOKEN
from skipvision.data.views import image_views
from skipvision.encoders.base import VisionEncoder


def declared_question_types(data: DictConfig, evaluation: DictConfig) -> tuple[str, ...]:
    """The question types validation accuracy is reported for, the same on every rank and known before any data is
    read: ``eval.question_types``, else the ``question_types`` of ``<data.root>/meta.json`` when validation reads
    ``data.root`` (no ``data.val_shards``), else none (only ``val/acc_all``)."""
    if evaluation.question_types is not None:
        return tuple(evaluation.question_types)
    meta = Path(data.root) / "meta.json"
    if data.val_shards is None and meta.is_file():
        return tuple(json.loads(meta.read_text()).get("question_types", ()))
    return ()


class WebDataModule(L.LightningDataModule):
    """Streams ``data.train_shards`` / ``data.val_shards`` (default ``<root>/{train,val}/*.tar``)."""

    def __init__(
        self,
        data: DictConfig,
        tokenizer: PreTrainedTokenizerBase,
        encoder: VisionEncoder,
        num_image_tokens: int,
        seed: int = 0,
        tiles: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.cfg = data
        self.tokenizer = tokenizer
        self.transform = image_views(encoder, tiles)
        self.num_image_tokens = num_image_tokens
        self.seed = seed

    def _shards(self, split: str) -> list[str]:
        pattern = self.cfg[f"{split}_shards"] or str(Path(self.cfg.root) / split / "*.tar")
        return expand_shards(pattern, self.cfg.on_error)

    def _loader(self, split: str, training: bool) -> DataLoader:
        encoder = SampleEncoder(
            self.tokenizer,
            self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
            self.num_image_tokens,
            self.transform,
            self.cfg.max_length,
            with_prompt=not training,
            system=self.cfg.system_prompt,
        )
        trainer = self.trainer
        placement = Placement() if trainer is None else Placement(trainer.global_rank, trainer.world_size)
        start_step = 0 if trainer is None else trainer.global_step  # of a resumed run
        accumulate = 1 if trainer is None else trainer.accumulate_grad_batches
        pipeline = build_pipeline(
            self._shards(split),
            encoder,
            batch_size=self.cfg.batch_size if training else self.cfg.val_batch_size,
            pad_id=self.tokenizer.pad_token_id,
            on_error=self.cfg.on_error,
            training=training,
            resampled=self.cfg.resampled,
            shuffle_buffer=self.cfg.shuffle_buffer,
            seed=self.seed,
            placement=placement,
            epoch_batches=self.cfg.epoch_batches,
            start_step=start_step,
            start_batch=(start_step * accumulate) % self.cfg.epoch_batches if self.cfg.epoch_batches else 0,
            max_errors_in_a_row=self.cfg.max_errors_in_a_row,
            group_by_modality_length=self.cfg.group_by_modality_length,
        )
        workers = self.cfg.num_workers
        return DataLoader(pipeline, batch_size=None, num_workers=workers, persistent_workers=workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", training=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", training=False)
