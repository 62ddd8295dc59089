"""Training callbacks: throughput on the progress bar, the resolved recipe next to the checkpoints, plain progress
lines and a closing summary where there is no terminal."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
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


class PlainProgress(L.Callback):
    """Readable logs where there is no terminal (a file, a SLURM job): a plain line every ``every`` steps (step of
    total, loss, tokens/s, time left), the validation metrics per question type, and a closing summary naming the
    run folder and the checkpoint to generate with (docs/runs.md "Logs"). Rank 0 only."""

    def __init__(self, every: int, run_dir: Path) -> None:
        self.every, self.run_dir = every, run_dir
        self._start: float | None = None
        self._first_step = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start, self._first_step = time.perf_counter(), trainer.global_step

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step, total = trainer.global_step, trainer.max_steps
        if not trainer.is_global_zero or (step % self.every and step != total) or self._start is None:
            return
        done = max(1, step - self._first_step)
        left = (time.perf_counter() - self._start) / done * (total - step)
        metrics = trainer.callback_metrics
        parts = [f"step {step}/{total}"]
        parts += [
            f"{name} {float(metrics[key]):.4g}"
            for key, name in (("train/loss", "loss"), ("tok/s", "tok/s"))
            if key in metrics
        ]
        print(" | ".join([*parts, f"eta {_clock(left)}"]), flush=True)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero and not trainer.sanity_checking:  # after the module has logged its metrics
            print(f"validation at step {trainer.global_step}: {_metrics(trainer, 'val/')}", flush=True)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        last = self.run_dir / "checkpoints" / "last.ckpt"
        print(f"done: {trainer.global_step} steps; {_metrics(trainer, 'val/')}", flush=True)
        print(
            f"run folder: {self.run_dir}; generate with: python -m skipvision generate --checkpoint {last}", flush=True
        )


def _metrics(trainer: L.Trainer, prefix: str) -> str:
    found = {k[len(prefix) :]: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(prefix)}
    return ", ".join(f"{k} {v:.4g}" for k, v in sorted(found.items())) or "no validation yet"


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


class ParameterSummary(L.Callback):
    """One line at the start of fit, in place of Lightning's model table: parameters per component, trainable."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        parts = {name: pl_module.component(name) for name in ("encoder", "projector", "llm")}
        counts = {name: sum(p.numel() for p in part.parameters()) for name, part in parts.items()}
        trainable = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        total = sum(p.numel() for p in pl_module.parameters())
        each = ", ".join(f"{name} {_count(n)}" for name, n in counts.items())
        print(f"parameters: {_count(total)} ({_count(trainable)} trainable): {each}", flush=True)


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return str(n)


class StepProgressBar(TQDMProgressBar):
    """The terminal bar counts optimizer steps of the whole run (``step 300/1000``), also after a resume, instead of
    batches of an epoch whose length a streamed dataset does not know (Lightning shows ``Epoch 0/-2`` and
    ``300/249`` there); the ``v_num`` entry is dropped."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._count_steps(trainer)  # a run resumed mid-epoch gets no on_train_epoch_start for that epoch

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        super().on_train_epoch_start(trainer)
        self._count_steps(trainer)

    def _count_steps(self, trainer: L.Trainer) -> None:
        self.train_progress_bar.reset(total=trainer.max_steps)
        self.train_progress_bar.n = trainer.global_step
        self.train_progress_bar.set_description("step")

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        bar = self.train_progress_bar
        if bar is not None and not bar.disable:
            bar.n = trainer.global_step
            bar.set_postfix(self.get_metrics(trainer, pl_module))
            bar.refresh()

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics
