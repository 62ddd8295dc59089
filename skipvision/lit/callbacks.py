"""Training callbacks: throughput on the progress bar, the resolved recipe next to the checkpoints."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig

from skipvision.recipe import save_recipe


class Throughput(L.Callback):
    """Samples/s and tokens/s (non-padding) of the training loop, smoothed, shown on the progress bar."""

    def __init__(self, smoothing: float = 0.9) -> None:
        self.smoothing = smoothing
        self._last: float | None = None
        self._rates: dict[str, float] = {}

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        now = time.perf_counter()
        if self._last is not None:
            dt = now - self._last
            current = {
                "samples_per_s": batch["input_ids"].shape[0] / dt,
                "tokens_per_s": float(batch["attention_mask"].sum()) / dt,
            }
            for key, value in current.items():
                old = self._rates.get(key, value)
                self._rates[key] = self.smoothing * old + (1 - self.smoothing) * value
            pl_module.log("tok/s", self._rates["tokens_per_s"], prog_bar=True)
            pl_module.log("train/samples_per_s", self._rates["samples_per_s"])
        self._last = now


class SaveRecipe(L.Callback):
    """Writes the resolved recipe next to the checkpoints when fitting starts (rank 0 only)."""

    def __init__(self, recipe: DictConfig, checkpoint_dir: Path) -> None:
        self.recipe = recipe
        self.checkpoint_dir = checkpoint_dir

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            save_recipe(self.recipe, self.checkpoint_dir / "recipe.yaml")
