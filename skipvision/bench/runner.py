"""``python -m skipvision bench``: every variant of a bench recipe measured in one process, side by side.

Each variant is the recipe plus its ``bench.variants`` overrides, built with the same seed (the encoder, projector
and LLM start from identical weights; only the skip machinery differs) and fed the same samples. Repetitions take
turns across variants (variant A, B, C, A, B, C, ...), so drifting machine load hits all of them alike, and every
figure is the median of ``bench.repeats`` after ``bench.warmup``. Ratios are taken against ``bench.baseline`` in the
same run; next to each, the analytic ratio (:mod:`skipvision.costs`) and achieved/ideal = ideal ratio / achieved
ratio (the share of the ideal speed-up reached).
"""

from __future__ import annotations

import copy
import math
import platform
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from skipvision.bench.measure import (
    generation_fn,
    hooked_copy,
    prefill_measures,
    train_peak_memory,
    train_step_fn,
)
from skipvision.bench.profile import profile_once, summary
from skipvision.bench.report import add_ratios
from skipvision.costs import decode_step_flops, model_schedule, prefill_flops, train_step_flops
from skipvision.flops import LLMShape, measured_flops
from skipvision.lit import run as jobs
from skipvision.lit.module import VLMLitModule
from skipvision.model import VisionLanguageModel
from skipvision.recipe import RecipeError, build_recipe


@dataclass
class Variant:
    name: str
    cfg: DictConfig
    module: VLMLitModule
    datamodule: Any
    run_dir: Path


def variant_recipes(cfg: DictConfig) -> dict[str, DictConfig]:
    """The recipe of every variant: the bench recipe plus the variant's overrides, each in its own run folder."""
    bench = cfg.bench
    if bench.baseline not in bench.variants:
        raise RecipeError(f"bench.baseline={bench.baseline!r} is not a variant; variants: {sorted(bench.variants)}")
    for name, source in bench.weights_from.items():
        if name not in bench.variants or source not in bench.variants:
            raise RecipeError(
                f"bench.weights_from {name}: {source} names an unknown variant; variants: {sorted(bench.variants)}"
            )
    base = OmegaConf.to_container(cfg, resolve=True)
    recipes = {}
    for name, overrides in bench.variants.items():
        tree = copy.deepcopy(base)
        tree["output_dir"] = str(Path(cfg.output_dir) / name)
        recipes[name] = build_recipe(tree, list(overrides))
    return recipes


def build_variants(cfg: DictConfig) -> dict[str, Variant]:
    variants = {}
    for name, vcfg in variant_recipes(cfg).items():
        module, datamodule, run_dir = jobs.build(vcfg)  # seeds everything with the recipe's seed first
        variants[name] = Variant(name, vcfg, module, datamodule, run_dir)
    return variants


def first_batch(variant: Variant, split: str) -> dict[str, Any]:
    loader = variant.datamodule.train_dataloader() if split == "train" else variant.datamodule.val_dataloader()
    return next(iter(loader))


def interleaved(fns: dict[str, Callable[[], Any]], warmup: int, repeats: int) -> dict[str, list[Any]]:
    """Run every variant's closure in turns, the order reversed every other round (A B C, C B A, ...) so a variant's
    place in the round does not bias it; keep the results of the timed rounds."""
    results: dict[str, list[Any]] = {name: [] for name in fns}
    names = list(fns)
    for round_ in range(warmup + repeats):
        for name in names if round_ % 2 == 0 else names[::-1]:
            out = fns[name]()
            if round_ >= warmup:
                results[name].append(out)
    return results


def measure_speed(variants: dict[str, Variant], bench: DictConfig, device: torch.device) -> dict[str, dict]:
    """Training step, peak memory, prefill FLOPs, TTFT, decode ms/token, KV bytes for every variant."""
    figures: dict[str, dict] = {name: {} for name in variants}
    models, batches, vals = {}, {}, {}
    for name, v in variants.items():
        models[name] = copy.deepcopy(v.module.model).to(device)  # timing steps must not touch the trained weights
        batches[name] = _to(first_batch(v, "train"), device, bench.train_batch)
        vals[name] = _to(first_batch(v, "val"), device)
    steps = {name: train_step_fn(models[name].train(), batches[name]) for name in variants}
    for name, step in steps.items():
        step()  # warm-up, creates the optimizer state
        figures[name]["train_peak_mem_bytes"] = train_peak_memory(step, models[name])
    times = interleaved(steps, bench.warmup, bench.repeats)
    for name in variants:
        figures[name]["train_step_ms"] = statistics.median(times[name]) * 1000
        models[name].eval()
        figures[name].update(prefill_measures(models[name], vals[name]))
    ttft = interleaved({n: generation_fn(models[n], vals[n], 1, 1) for n in variants}, bench.warmup, bench.repeats)
    for name in variants:
        figures[name]["ttft_ms"] = statistics.median(s.ttft_ms for s in ttft[name])
    for rows in bench.decode_batches:
        fns = {n: generation_fn(models[n], vals[n], rows, bench.decode_tokens) for n in variants}
        decode = interleaved(fns, bench.warmup, bench.repeats)
        for name in variants:
            ms = statistics.median(s.ms_per_token for s in decode[name])
            figures[name].setdefault("decode_ms_per_token", {})[str(rows)] = ms
    for name in variants:
        figures[name].update(analytic(models[name], vals[name], batches[name], bench.train_batch))
    return figures


def analytic(model: Any, val: dict[str, Any], train: dict[str, Any], train_batch: int) -> dict[str, Any]:
    """The ideal costs of this variant (absolute; the report divides them by the baseline's): the LLM's from its
    token schedule (one image per prompt and per training sequence), the vision side's measured
    (:func:`visual_stage_flops`) and added to both."""
    shape = LLMShape.from_config(model.backbone.config)
    prompt_tokens, slots = int(val["prompt_mask"][0].sum()), model.num_image_tokens
    prompt = model_schedule(model, prompt_tokens - slots)
    train_schedule = model_schedule(model, train["input_ids"].shape[1] - slots, training=True)
    vision = visual_stage_flops(model)
    return {
        "visual_slots": slots,
        "prompt_tokens": prompt_tokens,
        "ideal": {
            "prefill_flops": prefill_flops(shape, prompt) + vision,
            "train_step_flops": train_step_flops(shape, train_schedule, train_batch) + 3 * vision * train_batch,
            "kv_positions": prompt.kv_positions,
            "decode_flops": decode_step_flops(shape, prompt),
        },
    }


@torch.no_grad()
def visual_stage_flops(model: VisionLanguageModel) -> int:
    """FLOPs of one image (all its views) through the encoder, the projector and the method's visual stage (a
    [CLS] row, the split, the merge, the summaries), measured with FlopCounterMode on the built model: they depend
    on the shapes only, so zero pixels do."""
    encoder = next(model.encoder.parameters())
    views = 1 if model.tiles is None else 1 + model.tiles[0] * model.tiles[1]
    pixels = torch.zeros(1, views, 3, *model.encoder.image_size, device=encoder.device, dtype=encoder.dtype)
    return measured_flops(lambda: model.image_features(pixels if model.tiles is not None else pixels[:, 0]))


def measure_accuracy(
    variants: dict[str, Variant], bench: DictConfig, train_steps: int | None, checkpoints: dict[str, str]
) -> dict[str, dict[str, float] | None]:
    """Answer accuracy per question type on the validation set, after ``train_steps`` steps of every trained variant
    (the same data, seed and schedule) or from given checkpoints; training-free variants take ``weights_from``."""
    accuracy: dict[str, dict[str, float] | None] = {}
    ready: set[str] = set(checkpoints)
    order = sorted(variants, key=lambda n: n in bench.weights_from)  # sources before the variants borrowing them
    for name in order:
        v = variants[name]
        val_batches = math.ceil(bench.val_samples / v.cfg.data.val_batch_size)
        tree = OmegaConf.to_container(v.cfg, resolve=True)
        source = bench.weights_from.get(name)
        if name in checkpoints:
            state = torch.load(checkpoints[name], map_location="cpu", weights_only=True)["state_dict"]
            v.module.load_state_dict(state)
        elif source is not None and source in ready:
            v.module.model.load_state_dict(variants[source].module.model.state_dict())
        elif train_steps:
            overrides = [f"trainer.max_steps={train_steps}", f"trainer.limit_val_batches={val_batches}"]
            trainer = jobs.build_trainer(build_recipe(tree, overrides), v.run_dir)
            trainer.fit(v.module, datamodule=v.datamodule)  # validates once at the end
            accuracy[name] = _accuracies(trainer.callback_metrics)
            ready.add(name)
            continue
        else:
            accuracy[name] = None
            continue
        trainer = jobs.build_trainer(build_recipe(tree, [f"trainer.limit_val_batches={val_batches}"]), v.run_dir)
        accuracy[name] = _accuracies(trainer.validate(v.module, datamodule=v.datamodule, verbose=False)[0])
    return accuracy


def _accuracies(metrics: dict[str, Any]) -> dict[str, float]:
    return {k.removeprefix("val/acc_"): float(x) for k, x in metrics.items() if k.startswith("val/acc_")}


def environment(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    return f"CPU ({cpu}), {torch.get_num_threads()} threads, torch {torch.__version__}"


def measure_hook_overhead(variant: Variant, bench: DictConfig, device: torch.device) -> dict[str, float]:
    """Training step of the baseline with keep-everything Skip-FFN hooks against the same model without them."""
    plain = copy.deepcopy(variant.module.model).to(device).train()
    batch = _to(first_batch(variant, "train"), device, bench.train_batch)
    steps = {"plain": train_step_fn(plain, batch), "hooked": train_step_fn(hooked_copy(plain).train(), batch)}
    times = interleaved(steps, bench.warmup, bench.repeats)
    plain_ms, hooked_ms = (statistics.median(times[k]) * 1000 for k in ("plain", "hooked"))
    return {"plain_step_ms": plain_ms, "hooked_step_ms": hooked_ms, "overhead": hooked_ms / plain_ms - 1}


def profile_variants(variants: dict[str, Variant], bench: DictConfig, device: torch.device) -> dict[str, str]:
    """A profile summary per variant: one training step (after a warm-up step) and one batch-1 prefill."""
    texts = {}
    for name, v in variants.items():
        model = copy.deepcopy(v.module.model).to(device).train()
        batch = _to(first_batch(v, "train"), device, bench.train_batch)
        train = profile_once(train_step_fn(model, batch), device)
        model.eval()
        val = _to(first_batch(v, "val"), device)
        prefill = profile_once(generation_fn(model, val, 1, 1), device)
        texts[name] = summary(name, "training step", train) + summary(name, "prefill + first token", prefill)
    return texts


def _to(batch: dict[str, Any], device: torch.device, rows: int | None = None) -> dict[str, Any]:
    return {k: x[:rows].to(device) if torch.is_tensor(x) else x for k, x in batch.items()}


def run_bench(
    cfg: DictConfig, train_steps: int | None = None, checkpoints: dict[str, str] | None = None, device: str = "cpu"
) -> dict[str, Any]:
    """Every figure of every variant, ratios included (see :mod:`.report`)."""
    checkpoints = dict(checkpoints or {})
    unknown = sorted(set(checkpoints) - set(cfg.bench.variants))
    if unknown:
        raise RecipeError(f"--checkpoint for unknown variant(s) {unknown}; variants: {sorted(cfg.bench.variants)}")
    dev = torch.device(device)
    variants = build_variants(cfg)
    figures = measure_speed(variants, cfg.bench, dev)
    accuracy = measure_accuracy(variants, cfg.bench, train_steps, checkpoints)
    for name in variants:
        figures[name]["accuracy"] = accuracy[name]
        figures[name]["description"] = OmegaConf.to_container(variants[name].cfg.model.skip, resolve=True)
    result = {
        "recipe": cfg.name,
        "environment": environment(dev),
        "baseline": cfg.bench.baseline,
        "train_steps": train_steps,
        "checkpoints": checkpoints,
        "settings": OmegaConf.to_container(cfg.bench, resolve=True),
        "hook_overhead": measure_hook_overhead(variants[cfg.bench.baseline], cfg.bench, dev),
        "variants": figures,
    }
    return add_ratios(result)
