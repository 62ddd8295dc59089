"""What the benchmark measures on one built model: training step time and peak memory, prefill FLOPs, time to first
token, decode ms/token, KV-cache bytes (docs/benchmarks.md).

Every function takes the model and a batch that is identical across variants (same samples, same seed); the
runner (:mod:`.runner`) interleaves the variants' repetitions so that machine noise hits them alike. Timing
functions return one repetition's seconds; the runner takes medians.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

import torch
from transformers import DynamicCache

from skipvision.flops import measured_flops
from skipvision.inference.generate import generate_tokens, prefill
from skipvision.inference.kv import kv_cache_bytes
from skipvision.inference.sampling import GenerationConfig
from skipvision.model import VisionLanguageModel
from skipvision.skip.ffn import SkipFFN


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock timings cover it (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def train_step_fn(model: VisionLanguageModel, batch: dict[str, Any], lr: float = 1e-4) -> Callable[[], float]:
    """One full training step (forward, backward, AdamW step) as a timed closure; it keeps its own optimizer so the
    optimizer state exists from the first (warm-up) call on, as in real training."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    device = model_device(model)

    def step() -> float:
        synchronize(device)
        start = time.perf_counter()
        out = model(
            batch["input_ids"], batch["attention_mask"], batch.get("pixel_values"), batch["num_images"], batch["labels"]
        )
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        return time.perf_counter() - start

    return step


def train_peak_memory(step: Callable[[], float], model: VisionLanguageModel) -> int:
    """Peak bytes of parameters, gradients, optimizer state and activations during one training step.

    CUDA: the allocator's peak. CPU: torch's own MemTracker (torch.distributed._tools), which follows every tensor
    the step allocates; run after a warm-up step so the optimizer state already exists.
    """
    device = model_device(model)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        step()
        return int(torch.cuda.max_memory_allocated(device))
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    tracker.track_external(model)
    with tracker:
        step()
    peak = tracker.get_tracker_snapshot("peak")
    return int(sum(stats.get("Total", 0) for stats in peak.values()))


def _prompts(batch: dict[str, Any], rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The first ``rows`` prompts of a collated batch, with their images."""
    ids, mask, num_images = batch["prompt_ids"][:rows], batch["prompt_mask"][:rows], batch["num_images"][:rows]
    pixels = batch.get("pixel_values")
    if pixels is not None:
        pixels = pixels[: int(num_images.sum())]
    keep = mask.any(0)  # drop columns that are padding in every kept row
    return ids[:, keep], mask[:, keep], pixels, num_images


@torch.no_grad()
def prefill_measures(model: VisionLanguageModel, batch: dict[str, Any], drop_kv: bool = True) -> dict[str, int]:
    """Measured FLOPs of one prompt's prefill (encoder + LLM, batch 1) and the KV-cache bytes it leaves, before and
    after the removal."""
    ids, mask, pixels, num_images = _prompts(batch, 1)
    result: dict[str, int] = {}

    def run() -> None:
        cache = DynamicCache(config=model.backbone.config)
        pre = prefill(model, ids, mask, pixels, num_images, cache, drop_kv)
        result["kv_bytes_prefill"] = pre.kv_bytes
        result["kv_bytes"] = kv_cache_bytes(cache)

    result["prefill_flops"] = measured_flops(run)
    return result


def generation_fn(model: VisionLanguageModel, batch: dict[str, Any], rows: int, new_tokens: int) -> Callable[[], Any]:
    """A closure that generates ``new_tokens`` for the first ``rows`` prompts (no EOS, so every step runs) and returns
    the first row's stats: time to first token and decode ms/token."""
    ids, mask, pixels, num_images = _prompts(batch, rows)
    config = GenerationConfig(max_new_tokens=new_tokens)

    def run() -> Any:
        return generate_tokens(model, ids, mask, pixels, num_images, config, eos_token_id=None)[0].stats

    return run


def hooked_copy(model: VisionLanguageModel) -> VisionLanguageModel:
    """A copy of a full (``none`` policy) model with Skip-FFN hooks on every layer and a keep-everything plan: the
    hook machinery's own cost, since the plan changes nothing (docs/method.md "The Skip-FFN layer"; the ``none``
    policy itself attaches no hooks)."""
    twin = copy.deepcopy(model)
    skip = SkipFFN(twin.backbone).attach()
    plain_run = twin.run_backbone

    def run_backbone(embedded: Any, *args: Any, **kwargs: Any) -> Any:
        skip.set_plan(torch.ones(embedded.embeds.shape[:2], dtype=torch.bool, device=embedded.embeds.device))
        return plain_run(embedded, *args, **kwargs)

    twin.run_backbone = run_backbone
    return twin
