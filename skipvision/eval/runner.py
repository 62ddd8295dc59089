"""Generating the answers of an eval set with one or several models, and scoring them (docs/evaluation.md).

The Python API of ``skipvision eval`` (and what the lmms-eval adapter calls, so its answers are the same):

    from skipvision.eval import ModelSpec, read_eval_set, run_eval
    items = read_eval_set("pope.jsonl", "yesno")
    [result] = run_eval([ModelSpec("ours", "runs/shapes-tiny")], items, "yesno")
    result.predictions, result.scored.overall["f1"], result.scored.categories

Generation is :meth:`VLMGenerator.generate <skipvision.inference.generator.VLMGenerator.generate>`, greedy, through
the KV-removal loop, ``batch_size`` items at a time in the set's order; each item's prompt is its question as is
(plus ``instruction`` on a new line) with its image (:func:`eval_request`). Models run one after the other, each
freed before the next loads.
"""

from __future__ import annotations

import gc
import io
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn, TimeElapsedColumn
from rich.text import Text

from skipvision.eval.data import EvalDataError, EvalItem
from skipvision.eval.scoring import MAX_NEW_TOKENS, Scored, score
from skipvision.inference.generator import Request, RequestError, VLMGenerator, name_request
from skipvision.inference.sampling import GenerationConfig


@dataclass(frozen=True)
class ModelSpec:
    """A model to evaluate: a run folder, its ``checkpoints/`` folder, a ``.ckpt``, an export folder or an HF LLaVA
    folder; for a LLaVA folder, optionally a training-free skip ``policy`` spec (``{name: fastv, layer: 2}``)."""

    name: str
    checkpoint: str
    policy: Any = None

    @property
    def skip(self) -> dict[str, Any] | None:
        """The ``skip`` section :meth:`VLMGenerator.from_checkpoint` takes (None: the checkpoint's own model)."""
        return None if self.policy is None else {"policy": self.policy}


@dataclass
class ModelResult:
    model: ModelSpec
    predictions: list[str]  # in the eval set's order
    scored: Scored
    seconds: float  # generation time, model loading excluded

    @property
    def samples_per_s(self) -> float:
        return len(self.predictions) / self.seconds if self.seconds else 0.0


def eval_prompt(item: EvalItem, instruction: str | None = None) -> str:
    """The user message of an item: its question, and ``instruction`` (if any) on a new line."""
    return item.question if instruction is None else f"{item.question}\n{instruction}"


def eval_request(item: EvalItem, instruction: str | None = None) -> Request:
    """The generation request of an item: :func:`eval_prompt`, its image (a shard's bytes decoded here) and its own
    system prompt, if it has one (else the model's)."""
    image: Any = item.image
    if isinstance(image, bytes):
        try:
            with Image.open(io.BytesIO(image)) as img:
                image = img.convert("RGB")
        except (UnidentifiedImageError, OSError) as err:
            raise EvalDataError(f"{item.source}: cannot read the image ({err})") from None
    return Request(eval_prompt(item, instruction), image, item.system)


def generation_config(task: str, max_new_tokens: int | None = None, drop_kv: bool = True) -> GenerationConfig:
    """Greedy decoding with the task's default budget (``MAX_NEW_TOKENS``) unless ``max_new_tokens`` is given."""
    return GenerationConfig(max_new_tokens=max_new_tokens or MAX_NEW_TOKENS[task], drop_kv=drop_kv)


def predict(
    generator: VLMGenerator,
    items: Sequence[EvalItem],
    config: GenerationConfig,
    batch_size: int = 8,
    instruction: str | None = None,
    advance: Callable[[int], None] | None = None,
) -> list[str]:
    """The generated text of every item, ``batch_size`` at a time (images are decoded one batch at a time);
    ``advance`` is told how many items each batch finished. A request that cannot run fails naming its item."""
    texts: list[str] = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        requests = [eval_request(item, instruction) for item in chunk]
        try:
            generations = generator.generate(requests, config, batch_size)
        except RequestError as err:
            raise EvalDataError(name_request(err, [item.source for item in chunk])) from None
        texts += [g.text or "" for g in generations]
        if advance is not None:
            advance(len(chunk))
    return texts


class Throughput(ProgressColumn):
    """Samples per second over the last seconds of the task (rich's own speed estimate; its final one when done)."""

    def render(self, task: Task) -> Text:
        rate = task.finished_speed or task.speed
        speed = "--" if rate is None else f"{rate:.2f}"
        return Text(f"{speed} samples/s", style="progress.data.speed")


def run_eval(
    models: Sequence[ModelSpec],
    items: Sequence[EvalItem],
    task: str,
    *,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    instruction: str | None = None,
    drop_kv: bool = True,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    progress: bool = True,
) -> list[ModelResult]:
    """Each model's predictions on ``items`` with the same prompts and settings, scored for ``task``; with
    ``progress``, a bar per model with its throughput on stderr."""
    config = generation_config(task, max_new_tokens, drop_kv)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), Throughput(), TimeElapsedColumn())
    results = []
    with Progress(*columns, console=Console(stderr=True), disable=not progress) as bar:
        for model in models:
            generator = VLMGenerator.from_checkpoint(model.checkpoint, device, dtype, model.skip)
            task_id = bar.add_task(model.name, total=len(items))
            started = time.perf_counter()
            texts = predict(generator, items, config, batch_size, instruction, partial(bar.advance, task_id))
            seconds = time.perf_counter() - started
            results.append(ModelResult(model, texts, score(task, items, texts), seconds))
            del generator
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return results
