"""LightningModule: training loss, validation loss and answer accuracy, optimiser and LR schedule.

Per-component learning rates and freeze flags (encoder, projector, LLM), AdamW, linear warmup then cosine decay
to ``lr * min_lr_ratio`` at ``trainer.max_steps``. Answer accuracy greedy-decodes each validation prompt's short
answer through the inference loop (skipvision/inference/generate.py: KV removal after prefill unless
``eval.drop_kv`` is false) and compares it with the reference (case and surrounding space ignored), per question
type.

Distributed runs stay in step (docs/distributed.md "SPMD"): the accuracy metrics are declared up front from the
dataset's question types, in the same order on every rank (a sample of another type counts in ``val/acc_all`` only,
with a warning); a text-only batch still runs the vision side
(``VisionLanguageModel.spmd``); generation runs until every rank's rows have ended; validation fillers
(``batch["fillers"]``) count for nothing.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torchmetrics import MeanMetric, SumMetric
from transformers import PreTrainedTokenizerBase

from skipvision.data.templates import end_of_turn_ids
from skipvision.data.tokenizer import load_tokenizer
from skipvision.inference.generate import generate_tokens
from skipvision.inference.sampling import GenerationConfig
from skipvision.lit.fsdp import FSDP_STRATEGIES, shard_and_load
from skipvision.model import VisionLanguageModel
from skipvision.recipe import RecipeError
from skipvision.skeleton import skeleton

COMPONENTS = ("encoder", "projector", "llm")
log = logging.getLogger(__name__)


def normalise_answer(text: str) -> str:
    return text.strip().strip(".").lower()


class VLMLitModule(L.LightningModule):
    """Wraps ``VisionLanguageModel``; the resolved recipe is stored in every checkpoint's hyperparameters."""

    def __init__(
        self,
        recipe: dict[str, Any],
        tokenizer_path: str,
        question_types: Sequence[str] = (),
        tokenizer: PreTrainedTokenizerBase | None = None,
    ) -> None:
        """``tokenizer``: the one saved at ``tokenizer_path``, passed in when it is not written yet (a new run)."""
        super().__init__()
        self.save_hyperparameters(ignore=["tokenizer"])
        self.cfg: DictConfig = OmegaConf.create(recipe)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(tokenizer_path)
        self.sharded = self.cfg.trainer.strategy in FSDP_STRATEGIES
        with skeleton() if self.sharded else contextlib.nullcontext():
            self.model = self.build_model()  # FSDP: only the structure here; configure_model gives it weights
        self.generation = GenerationConfig(max_new_tokens=self.cfg.eval.max_new_tokens, drop_kv=self.cfg.eval.drop_kv)
        for part in COMPONENTS:
            if self.cfg.optim[f"freeze_{part}"]:
                self.component(part).requires_grad_(False)
        self.val_loss = MeanMetric()
        self.val_data_errors = SumMetric()  # validation samples that could not be read (replaced by fillers)
        self.undeclared: set[str] = set()
        self.val_accuracy = nn.ModuleDict({key: MeanMetric() for key in ("all", *question_types)})
        self.data_errors = 0
        self.end_of_turn = end_of_turn_ids(self.tokenizer)  # generation stops on EOS or the template's turn end

    def build_model(self) -> VisionLanguageModel:
        """The model as the recipe describes it, initialised under the recipe's seed (the same weights everywhere),
        leaving the global random state as it was."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed)
            return VisionLanguageModel.from_recipe(OmegaConf.to_container(self.cfg.model, resolve=True), self.tokenizer)

    def setup(self, stage: str) -> None:
        self.model.spmd = self.trainer.world_size > 1

    def configure_model(self) -> None:
        """Activation checkpointing (``trainer.activation_checkpointing``), then, for FSDP, sharding and weights
        (skipvision/lit/fsdp.py). Lightning calls this once the processes are set up, on every rank."""
        if self.cfg.trainer.activation_checkpointing:
            if self.model.drop_stages(training=True):
                raise RecipeError(
                    f"trainer.activation_checkpointing cannot run with skip policy {self.cfg.model.skip.policy}: "
                    "it drops tokens inside the LLM in training, and recomputation would drop them twice; turn one off"
                )
            self.model.backbone.activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False}
            )
        if not self.sharded or isinstance(self.model, FSDPModule):
            return
        rank, world, precision = self.trainer.global_rank, self.trainer.world_size, self.cfg.trainer.precision
        shard_and_load(self.model, self.build_model, rank, world, self.device, precision)

    def component(self, part: str) -> nn.Module:
        return {"encoder": self.model.encoder, "projector": self.model.projector, "llm": self.model.backbone}[part]

    def forward(self, batch: dict[str, Any]) -> Any:
        return self.model(
            batch["input_ids"],
            batch["attention_mask"],
            batch.get("pixel_values"),
            batch["num_images"],
            batch["labels"],
        )

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        out = self(batch)
        self.data_errors += batch["data_errors"]
        self.log("train/loss", out.loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        if out.aux_loss is not None:
            self.log("train/aux_loss", out.aux_loss)
        self.log("data/skipped", float(self.data_errors), reduce_fx="sum", sync_dist=True)
        return out.loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.val_data_errors.update(batch["data_errors"])
        out = self(batch)
        self.val_loss.update(out.loss, weight=(batch["labels"] != -100).sum())
        if not self.cfg.eval.generate:
            return
        generations = generate_tokens(
            self.model,
            batch["prompt_ids"],
            batch["prompt_mask"],
            batch.get("pixel_values"),
            batch["num_images"],
            self.generation,
            self.end_of_turn,
            self.tokenizer,
            agree=self.all_ranks_agree if self.trainer.world_size > 1 else None,
        )
        rows = zip(generations, batch["answers"], batch["qtypes"], batch["fillers"], strict=True)
        for generation, answer, qtype, filler in rows:
            if filler:
                continue
            correct = float(normalise_answer(generation.text) == normalise_answer(answer))
            self.val_accuracy["all"].update(correct)
            if qtype in self.val_accuracy:
                self.val_accuracy[qtype].update(correct)
            elif qtype not in self.undeclared:
                self.undeclared.add(qtype)
                log.warning(
                    "validation question type %r is not declared (eval.question_types or the dataset's meta.json: "
                    "%s); it counts in val/acc_all only",
                    qtype,
                    ", ".join(k for k in self.val_accuracy if k != "all") or "none",
                )

    def all_ranks_agree(self, answer: bool) -> bool:
        """True when ``answer`` is True on every rank (one all-reduce)."""
        flag = torch.tensor(int(answer), device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag)

    def on_validation_epoch_end(self) -> None:
        self.log("val/loss", self.val_loss.compute(), prog_bar=True, sync_dist=True)
        self.val_loss.reset()
        self.log("val/data_skipped", self.val_data_errors.compute(), sync_dist=True)  # summed over ranks already
        self.val_data_errors.reset()
        for qtype, metric in self.val_accuracy.items():
            value = metric.compute()  # over all ranks; the same on each, so each skips the same types
            if not torch.isnan(value):
                self.log(f"val/acc_{qtype}", value, prog_bar=qtype == "all", sync_dist=True)
            metric.reset()

    def configure_optimizers(self) -> dict[str, Any]:
        o = self.cfg.optim
        groups = []
        for part in COMPONENTS:
            params = [p for p in self.component(part).parameters() if p.requires_grad]
            if params:
                lr = o[f"lr_{part}"] if o[f"lr_{part}"] is not None else o.lr
                groups.append({"params": params, "lr": lr, "name": part})
        optimizer = torch.optim.AdamW(groups, betas=tuple(o.betas), weight_decay=o.weight_decay)
        schedule = warmup_cosine(o.warmup_steps, self.cfg.trainer.max_steps, o.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float):
    """LR multiplier: linear warmup from 0 to 1, then cosine from 1 down to ``min_ratio`` at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor
