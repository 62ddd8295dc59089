"""Recipe -> data, model, Trainer; the ``fit`` and ``validate`` jobs behind the CLI.

Run folder layout (``output_dir``)::

    recipe.yaml            the resolved recipe
    tokenizer/             the tokenizer the model was built with
    checkpoints/           step checkpoints, last.ckpt, and recipe.yaml again (next to every checkpoint)
    logs/                  CSV or TensorBoard logs
"""

from __future__ import annotations

import difflib
import json
import shutil
import sys
import zipfile
from pathlib import Path
from typing import Any

import lightning as L
from filelock import FileLock
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.strategies import ModelParallelStrategy
from omegaconf import DictConfig, OmegaConf

from skipvision.data.pipeline import DataError
from skipvision.data.shapes import ShapesSettings, dataset_is_complete, generate_shapes, settings_mismatch
from skipvision.data.tokenizer import load_tokenizer, prepare_tokenizer
from skipvision.errors import MissingFileError
from skipvision.inference.checkpoint import CheckpointError, is_sharded
from skipvision.lit.callbacks import ParameterSummary, PlainProgress, SaveRecipe, StepProgressBar, Throughput
from skipvision.lit.checkpoint_io import AtomicCheckpointIO, remove_partials
from skipvision.lit.datamodule import WebDataModule, declared_question_types
from skipvision.lit.fsdp import FSDP_PRECISIONS, FSDP_STRATEGIES
from skipvision.lit.module import VLMLitModule
from skipvision.lit.quiet import silence_noise
from skipvision.lit.requeue import slurm_requeue
from skipvision.lit.runfolder import checkpoints_in, claim, is_first_process
from skipvision.recipe import RecipeError, save_recipe
from skipvision.registry import import_modules, load_entry_point_plugins


def activate_plugins(cfg: DictConfig) -> None:
    """Register third-party components: entry points of ``skipvision.plugins`` and the recipe's ``imports``."""
    load_entry_point_plugins()
    import_modules(list(cfg.imports))


def prepare_data(cfg: DictConfig) -> Path:
    """Generate the shapes dataset into ``data.root`` when it is missing (once, under a file lock).

    Returns the tokenizer folder.
    """
    data = cfg.data
    root = Path(data.root)
    settings = ShapesSettings(**OmegaConf.to_container(data.shapes, resolve=True))
    uses_root = data.train_shards is None or data.tokenizer is None
    if uses_root and not dataset_is_complete(root):
        if not settings.generate:
            raise DataError(f"No dataset at {root} (no meta.json) and data.shapes.generate is false")
        root.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(f"{root}.lock"):
            if not dataset_is_complete(root):
                generate_shapes(root, settings)
    if uses_root:
        _check_generated_matches(root, settings)
    tokenizer = Path(data.tokenizer) if data.tokenizer else root / "tokenizer"
    if not (tokenizer / "tokenizer.json").is_file():
        raise MissingFileError(f"No tokenizer.json in {tokenizer}")
    return tokenizer


def _check_generated_matches(root: Path, settings: ShapesSettings) -> None:
    """A generated dataset is reused only if it was generated with the settings the recipe asks for."""
    meta_file = root / "meta.json"
    meta = json.loads(meta_file.read_text())
    if "image_size" not in meta:
        return  # not a generated shapes dataset (e.g. converted shards with their own meta.json)
    differ = settings_mismatch(meta, settings)
    if differ:
        diff = ", ".join(f"{k}: {have} on disk, {want} in the recipe" for k, (have, want) in differ.items())
        raise DataError(
            f"{root} holds a shapes dataset generated with other settings ({diff}); point data.root at another "
            "folder or delete it to regenerate"
        )


def _logger(cfg: DictConfig, run_dir: Path) -> Logger | bool:
    kind = cfg.trainer.logger
    if kind == "csv":
        return CSVLogger(run_dir, name="logs")
    if kind == "tensorboard":
        return TensorBoardLogger(run_dir, name="logs")
    return False


STRATEGIES = ("auto", "ddp", "ddp_find_unused_parameters_true", *FSDP_STRATEGIES)


def check_strategy(trainer: DictConfig) -> None:
    """Fail before anything is built when ``trainer.strategy`` is not one skipvision runs (Lightning's own error
    says only "Example choices" and comes after the model and data are built), or FSDP gets a precision Lightning's
    ModelParallelStrategy refuses. ``fsdp`` is FSDP2 (lit/fsdp.py)."""
    strategy = trainer.strategy
    if strategy not in STRATEGIES:
        close = difflib.get_close_matches(strategy, STRATEGIES, n=3, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise RecipeError(
            f"Recipe key 'trainer.strategy' is {strategy!r}.{hint} Valid values: {', '.join(STRATEGIES)}."
        )
    if strategy in FSDP_STRATEGIES and trainer.precision not in FSDP_PRECISIONS:
        raise RecipeError(
            f"Recipe key 'trainer.precision' is {trainer.precision!r}, which FSDP (trainer.strategy={strategy}) does "
            f"not run; valid values with FSDP: {', '.join(FSDP_PRECISIONS)}."
        )


def build_trainer(cfg: DictConfig, run_dir: Path) -> L.Trainer:
    t, c = cfg.trainer, cfg.checkpoint
    checkpoint_dir = run_dir / "checkpoints"
    callbacks: list[L.Callback] = [
        ModelCheckpoint(
            dirpath=checkpoint_dir,
            filename="step={step}",
            auto_insert_metric_name=False,
            every_n_train_steps=c.every_n_steps or t.max_steps,
            save_top_k=-1,
            save_last=c.save_last,
            enable_version_counter=False,
        ),
        SaveRecipe(cfg, checkpoint_dir),
        Throughput(),
        ParameterSummary(),
    ]
    silence_noise()
    terminal = sys.stdout.isatty()
    if not terminal:  # a file or a job log: plain lines instead of a progress bar (lit/callbacks.py)
        callbacks.append(PlainProgress(t.log_every_n_steps, run_dir))
    elif t.enable_progress_bar:
        callbacks.append(StepProgressBar())
    slurm_plugins, slurm_callbacks = slurm_requeue()  # under SLURM: save and requeue on USR1 (lit/requeue.py)
    callbacks += slurm_callbacks
    logger = _logger(cfg, run_dir)
    if logger:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    return L.Trainer(
        max_steps=t.max_steps,
        val_check_interval=t.val_check_interval or t.max_steps,
        check_val_every_n_epoch=None,
        limit_val_batches=t.limit_val_batches,
        num_sanity_val_steps=0,
        precision=t.precision,
        gradient_clip_val=t.gradient_clip_val,
        accumulate_grad_batches=t.accumulate_grad_batches,
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=ModelParallelStrategy() if t.strategy in FSDP_STRATEGIES else t.strategy,
        logger=logger,
        log_every_n_steps=t.log_every_n_steps,
        enable_progress_bar=t.enable_progress_bar and terminal,
        enable_model_summary=False,  # ParameterSummary prints one line instead
        deterministic=t.deterministic,
        callbacks=callbacks,
        default_root_dir=run_dir,
        plugins=[*slurm_plugins, *([] if t.strategy in FSDP_STRATEGIES else [AtomicCheckpointIO()])],
    )


def build(cfg: DictConfig) -> tuple[VLMLitModule, WebDataModule, Path]:
    """Data (generated if missing), the LightningModule and the DataModule for a recipe.

    The model is built (every registry spec and weight source checked) before anything is written into the run
    folder; then the first process writes the tokenizer and the recipe there (docs/runs.md "Run folders")."""
    activate_plugins(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    run_dir = Path(cfg.output_dir)
    source = prepare_data(cfg)
    tokenizer_dir = run_dir.resolve() / "tokenizer"
    if (tokenizer_dir / "tokenizer.json").is_file():  # a resumed run keeps the tokenizer (and template) it saved
        tokenizer = load_tokenizer(tokenizer_dir)
    else:
        tokenizer = prepare_tokenizer(load_tokenizer(source), cfg.data.chat_template, cfg.data.system_prompt)
    recipe: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    question_types = declared_question_types(cfg.data, cfg.eval)
    module = VLMLitModule(recipe, str(tokenizer_dir), question_types, tokenizer=tokenizer)
    run_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(run_dir / ".setup.lock"):  # ranks started together (srun) wait for the first one's files
        if not (tokenizer_dir / "tokenizer.json").is_file():
            tokenizer.save_pretrained(tokenizer_dir)
        if is_first_process():
            save_recipe(cfg, run_dir / "recipe.yaml")
    model = module.model
    datamodule = WebDataModule(cfg.data, module.tokenizer, model.encoder, model.num_image_tokens, cfg.seed, model.tiles)
    return module, datamodule, run_dir


def resolve_resume(cfg: DictConfig, run_dir: Path) -> str | None:
    """The checkpoint ``fit`` starts from, by ``checkpoint.resume``: None starts fresh; ``last`` is
    ``checkpoints/last.ckpt``, which must exist; ``auto`` is the newest (by modification time) of the run folder's
    ``hpc_ckpt_<n>.ckpt`` (saved on SLURM's requeue signal, skipvision/lit/requeue.py) and ``checkpoints/last.ckpt``,
    or a fresh start when there is neither (what a SLURM job runs with, so its first attempt starts and a requeued
    one resumes); anything else is a checkpoint path, which must exist."""
    resume = cfg.checkpoint.resume
    if resume is None:
        return None
    if resume == "auto":
        candidates = [*sorted(run_dir.glob("hpc_ckpt_*.ckpt")), run_dir / "checkpoints" / "last.ckpt"]
        found = [p for p in candidates if p.exists()]
        return str(max(found, key=lambda p: p.stat().st_mtime_ns)) if found else None
    path = run_dir / "checkpoints" / "last.ckpt" if resume == "last" else Path(resume)
    if not path.exists():  # a file, or a folder of shards (FSDP)
        raise MissingFileError(f"checkpoint.resume={resume!r}: no checkpoint at {path}")
    check_readable(path, cfg.trainer.strategy)
    check_intact(path)
    return str(path)


def is_intact(path: Path) -> bool:
    """Whether a checkpoint file is complete: its zip directory, written last, is there (cheap: no tensor is read)."""
    try:
        with zipfile.ZipFile(path):
            return True
    except (zipfile.BadZipFile, OSError):
        return False


def check_intact(path: Path) -> None:
    """Refuse a truncated or corrupt checkpoint file, naming the newest intact one of its folder to resume from."""
    if path.is_dir() or is_intact(path):
        return
    steps = sorted(path.parent.glob("step=*.ckpt"), key=lambda p: p.stat().st_mtime_ns, reverse=True)
    intact = next((p for p in steps if p.is_file() and is_intact(p)), None)
    hint = f"; the newest intact checkpoint is {intact} (checkpoint.resume={intact})" if intact else ""
    raise CheckpointError(f"{path} is incomplete or corrupt (a write cut short?){hint}")


def check_readable(checkpoint: Path, strategy: str) -> None:
    """A sharded (FSDP) checkpoint folder is read by the FSDP strategy only (on any number of ranks)."""
    if is_sharded(checkpoint) and strategy not in FSDP_STRATEGIES:
        raise CheckpointError(
            f"{checkpoint} is a sharded FSDP checkpoint: use it with trainer.strategy=fsdp (any number of devices), "
            "or write its weights to one file with `skipvision consolidate`"
        )


def fit(cfg: DictConfig) -> L.Trainer:
    """Train; the run folder is claimed first (lit/runfolder.py): another run's folder or a concurrent fit is
    refused in one line."""
    check_strategy(cfg.trainer)
    run_dir = Path(cfg.output_dir)
    with claim(run_dir, resuming=cfg.checkpoint.resume is not None, overwrite=cfg.checkpoint.overwrite):
        if is_first_process():
            remove_partials(run_dir / "checkpoints")  # left by a writer that was killed mid-write
        if cfg.checkpoint.overwrite and is_first_process():
            for old in checkpoints_in(run_dir):
                shutil.rmtree(old) if old.is_dir() else old.unlink()
        module, datamodule, run_dir = build(cfg)
        trainer = build_trainer(cfg, run_dir)
        trainer.fit(module, datamodule=datamodule, ckpt_path=resolve_resume(cfg, run_dir))
    return trainer


def validate(cfg: DictConfig, checkpoint: str) -> list[dict[str, float]]:
    """Validation loss and answer accuracy of a checkpoint on the recipe's validation shards."""
    check_strategy(cfg.trainer)
    if not Path(checkpoint).exists():
        raise MissingFileError(f"No checkpoint at {checkpoint}")
    check_readable(Path(checkpoint), cfg.trainer.strategy)
    module, datamodule, run_dir = build(cfg)
    trainer = build_trainer(cfg, run_dir)
    return trainer.validate(module, datamodule=datamodule, ckpt_path=checkpoint)
