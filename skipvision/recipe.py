"""YAML recipes: the schema, ``defaults:`` inheritance, ``key=value`` overrides and validation.

A recipe is plain omegaconf YAML checked against the dataclass schema below. Unknown keys fail with the key's
full path, close matches and the valid keys at that level; wrong types fail with omegaconf's message. Component
specs (``model.encoder`` ...) are free-form here and validated by the registry against the builder's signature.
Merging rule for component specs: when an override names a different ``name``/``preset``, it replaces the spec
instead of merging into it (so switching ``timm`` -> ``hf_clip`` does not inherit timm's arguments).

Harness sections are defined by the harness that reads them and only placed here: ``data.shapes`` is
:class:`skipvision.data.shapes.ShapesSettings` (the synthetic data generator), ``bench`` is
:class:`skipvision.bench.settings.BenchSettings` (the side-by-side benchmark). Their keys are validated like the
core ones.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from skipvision.bench.settings import BenchSettings
from skipvision.data.shapes import ShapesSettings
from skipvision.errors import SkipvisionError
from skipvision.resources import shipped_recipes


class RecipeError(SkipvisionError, ValueError):
    """A recipe could not be loaded or validated; the message names the key or file."""


@dataclass
class DataConfig:
    root: str = "data/shapes"
    shapes: ShapesSettings = field(default_factory=ShapesSettings)  # generated into root on first use
    train_shards: str | None = None  # brace pattern or glob; default: <root>/train/*.tar
    val_shards: str | None = None  # default: <root>/val/*.tar
    tokenizer: str | None = None  # default: <root>/tokenizer
    chat_template: str = "auto"  # auto (the tokenizer's own, else skipvision_v1) | tokenizer | skipvision_v1 | llava_v1
    system_prompt: str | None = None  # a system message before every conversation (when the template takes one)
    batch_size: int = 32
    val_batch_size: int = 64
    num_workers: int = 1
    shuffle_buffer: int = 1000
    max_length: int = 256
    on_error: str = "skip"  # skip (count and go on) | raise (fail naming the shard and sample)
    max_errors_in_a_row: int = 1000  # skipped samples without one valid batch before the run stops (skip mode)
    resampled: bool = True  # training: endless resampled shards; false: shuffled passes split by rank/worker
    epoch_batches: int | None = None  # training batches per rank per epoch; None: one pass (or endless, resampled)
    group_by_modality_length: bool = False  # training batches of one modality, similar lengths (docs/data.md)


@dataclass
class SkipConfig:
    """Skip-Vision (docs/method.md "Token pipeline"). The ``none`` policy is the full model."""

    policy: Any = "none"  # none | uniform | attention_score | router (with num_retained or retain_ratio)
    compressor: Any = "token_merge"  # token_merge | avg_pool | identity
    num_skipped: int | None = None  # N_s, the merged size of the skipped group; None: no merge
    summary_tokens: bool = True  # s_R and s_S
    layers: list[int] | None = None  # decoder layers that skip the FFN; None: all
    mask_text_to_skipped: bool = False  # text cannot attend to S in training (docs/method.md "Masking ablation")


@dataclass
class ModelConfig:
    encoder: Any = None  # required: a spec, a registered name or a preset (see `skipvision list encoder`)
    projector: Any = "mlp2x_gelu"
    backbone: Any = None  # required, like encoder
    tiles: list[int] | None = None  # [rows, cols]: LLaVA-HD views, a thumbnail plus rows x cols high-res tiles
    skip: SkipConfig = field(default_factory=SkipConfig)


@dataclass
class OptimConfig:
    lr: float = 1e-3
    lr_encoder: float | None = None  # None: optim.lr
    lr_projector: float | None = None
    lr_llm: float | None = None
    freeze_encoder: bool = False
    freeze_projector: bool = False
    freeze_llm: bool = False
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio at trainer.max_steps


@dataclass
class TrainerConfig:
    max_steps: int = 1000
    val_check_interval: int | None = None  # steps; None: validate at the end only
    limit_val_batches: int | None = None
    precision: str = "32-true"  # 32-true | bf16-mixed | 16-mixed
    gradient_clip_val: float | None = 1.0
    accumulate_grad_batches: int = 1
    accelerator: str = "auto"
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"  # auto | ddp | ddp_find_unused_parameters_true | fsdp (FSDP2; docs/distributed.md)
    activation_checkpointing: bool = False  # recompute the decoder layers in backward (saves activation memory)
    logger: str = "csv"  # csv | tensorboard | none
    log_every_n_steps: int = 10
    enable_progress_bar: bool = True
    deterministic: bool = False


@dataclass
class CheckpointConfig:
    every_n_steps: int | None = None  # None: only at the end of fit
    save_last: bool = True
    resume: str | None = None  # None | last | auto (newest hpc or last checkpoint, else fresh) | a .ckpt path
    overwrite: bool = False  # fit into a folder that holds another run's checkpoints, replacing them


@dataclass
class EvalConfig:
    max_new_tokens: int = 4
    generate: bool = True  # greedy-decode answers during validation for answer accuracy
    drop_kv: bool = True  # decode with S removed from the KV cache (docs/method.md "KV removal"); false to compare
    question_types: list[str] | None = None  # accuracy per type; None: the dataset meta.json's question_types


@dataclass
class Recipe:
    name: str = "run"
    seed: int = 0
    output_dir: str = "runs/${name}"
    imports: list[str] = field(default_factory=list)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    bench: BenchSettings = field(default_factory=BenchSettings)


def find_recipe(recipe: str | Path) -> Path:
    """A recipe file, or the name of a shipped recipe (``shapes-tiny``; skipvision/resources.py)."""
    path = Path(recipe)
    if path.is_file():
        return path
    shipped = shipped_recipes()
    if str(recipe) in shipped:
        return shipped[str(recipe)]
    names = sorted(shipped)
    close = difflib.get_close_matches(str(recipe), names, n=3, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise RecipeError(
        f"Recipe {str(recipe)!r} not found: no such file, and no shipped recipe by that name.{hint} "
        f"Shipped recipes: {', '.join(names)}."
    )


def _read_with_defaults(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise RecipeError(f"Recipe defaults form a cycle: {' -> '.join(str(p) for p in (*seen, path))}")
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
    except yaml.MarkedYAMLError as err:  # names the line and column (1-based) of the problem
        mark = err.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "?"
        raise RecipeError(f"Recipe {path} is not valid YAML at {where}: {err.problem or err}") from None
    except (OSError, OmegaConfBaseException, yaml.YAMLError) as err:
        raise RecipeError(f"Cannot read recipe {path}: {err}") from err
    if not isinstance(raw, dict):
        raise RecipeError(f"Recipe {path} must be a mapping, got {type(raw).__name__}")
    merged: dict[str, Any] = {}
    for parent in raw.pop("defaults", []) or []:
        parent_path = (path.parent / parent) if not Path(parent).is_absolute() else Path(parent)
        if not parent_path.is_file():
            raise RecipeError(f"Recipe {path} lists defaults {parent!r}, but {parent_path} does not exist")
        merged = merge_specs(merged, _read_with_defaults(parent_path, (*seen, path)))
    return merge_specs(merged, raw)


def merge_specs(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``override`` into ``base``; a mapping whose ``name``/``preset`` changes is replaced whole."""
    out = dict(base)
    for key, value in override.items():
        old = out.get(key)
        if isinstance(old, dict) and isinstance(value, dict) and not _switches_component(old, value):
            out[key] = merge_specs(old, value)
        else:
            out[key] = value
    return out


def _switches_component(old: dict[str, Any], new: dict[str, Any]) -> bool:
    return any(k in new and new[k] != old.get(k) for k in ("name", "preset"))


def _check_keys(tree: Any, schema: type, where: str) -> None:
    if not isinstance(tree, dict):
        return
    fields = {f.name: f for f in dataclasses.fields(schema)}
    hints = typing.get_type_hints(schema)
    for key, value in tree.items():
        full = f"{where}.{key}" if where else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=3, cutoff=0.5)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            level = f"under '{where}'" if where else "at the top level"
            raise RecipeError(f"Unknown recipe key '{full}'.{hint} Valid keys {level}: {', '.join(fields)}.")
        if dataclasses.is_dataclass(hints[key]):
            _check_keys(value, hints[key], full)


def build_recipe(tree: dict[str, Any], overrides: list[str] | None = None) -> DictConfig:
    """Validate a recipe tree plus ``key=value`` overrides against the schema; returns a resolved DictConfig."""
    for item in overrides or []:
        if "=" not in item:
            raise RecipeError(f"Override {item!r} is not of the form key=value")
    try:
        dot = OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides or [])), resolve=False)
    except OmegaConfBaseException as err:
        raise RecipeError(f"Bad override: {err}") from err
    tree = merge_specs(tree, dot)  # type: ignore[arg-type]
    _check_keys(tree, Recipe, "")
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(Recipe), tree)
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as err:
        raise RecipeError(f"Invalid recipe value: {err}") from err
    _check_choices(cfg)
    for key in ("model.encoder", "model.backbone"):
        if OmegaConf.select(cfg, key) is None:
            raise RecipeError(f"Recipe key '{key}' is required (a component spec, a registered name or a preset)")
    return cfg  # type: ignore[return-value]


def _check_choices(cfg: DictConfig) -> None:
    choices = {
        "data.on_error": ("skip", "raise"),
        "trainer.logger": ("csv", "tensorboard", "none"),
        "trainer.precision": ("32-true", "32", "bf16-mixed", "16-mixed", "bf16-true"),
    }
    for key, valid in choices.items():
        value = str(OmegaConf.select(cfg, key))
        if value not in valid:
            raise RecipeError(f"Recipe key '{key}' is {value!r}; valid values: {', '.join(valid)}")
    for key, low in MINIMUMS.items():
        value = OmegaConf.select(cfg, key)
        if value is not None and value < low:
            raise RecipeError(f"Recipe key '{key}' is {value}; it must be at least {low}")
    for key in FRACTIONS:
        value = OmegaConf.select(cfg, key)
        if value is not None and not 0 <= value <= 1:
            raise RecipeError(f"Recipe key '{key}' is {value}; it must be between 0 and 1")


# Numeric recipe values with a lower bound, checked up front (a 0 batch size would fail deep in a DataLoader).
MINIMUMS = {
    "data.batch_size": 1,
    "data.val_batch_size": 1,
    "data.num_workers": 0,
    "data.shuffle_buffer": 1,
    "data.max_length": 1,
    "data.epoch_batches": 1,
    "data.max_errors_in_a_row": 1,
    "optim.lr": 0.0,
    "optim.weight_decay": 0.0,
    "optim.warmup_steps": 0,
    "trainer.max_steps": 1,
    "trainer.val_check_interval": 1,
    "trainer.limit_val_batches": 0,
    "trainer.accumulate_grad_batches": 1,
    "trainer.num_nodes": 1,
    "trainer.log_every_n_steps": 1,
    "checkpoint.every_n_steps": 1,
    "eval.max_new_tokens": 1,
    "model.skip.num_skipped": 1,
}
FRACTIONS = ("optim.min_lr_ratio",)


def load_recipe(recipe: str | Path, overrides: list[str] | None = None) -> DictConfig:
    """Load a recipe file (with its ``defaults:`` chain) and apply ``key=value`` overrides."""
    return build_recipe(_read_with_defaults(find_recipe(recipe)), overrides)


def save_recipe(cfg: DictConfig, path: str | Path) -> Path:
    """Write the resolved recipe as YAML (saved next to every checkpoint)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, path, resolve=True)
    return path


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
