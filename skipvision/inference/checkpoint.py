"""Load a trained model from a run folder without Lightning, for generation and the Python API.

A run folder (``output_dir`` of ``fit``) holds ``recipe.yaml``, ``tokenizer/`` and ``checkpoints/*.ckpt``. Any of
these resolves to the same three files: the run folder, its ``checkpoints/`` folder, or one ``.ckpt`` file in it.
The model is rebuilt from the recipe exactly as training built it, then the checkpoint's weights are loaded
strictly (a missing or unexpected tensor is an error, never a silently half-loaded model).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import PreTrainedTokenizerBase

from skipvision.data.tokenizer import load_tokenizer
from skipvision.errors import SkipvisionError
from skipvision.model import VisionLanguageModel
from skipvision.recipe import load_recipe
from skipvision.registry import import_modules, load_entry_point_plugins

MODEL_PREFIX = "model."  # VLMLitModule keeps the VisionLanguageModel under .model


class CheckpointError(SkipvisionError, FileNotFoundError):
    """A checkpoint path is missing files the model needs."""


@dataclass
class CheckpointFiles:
    weights: Path  # a Lightning .ckpt
    recipe: Path  # the resolved recipe the model was trained with
    tokenizer: Path  # folder with tokenizer.json


def locate(path: str | Path) -> CheckpointFiles:
    """Resolve a run folder, its ``checkpoints/`` folder or a ``.ckpt`` file; name every missing file."""
    path = Path(path)
    if path.is_file():
        weights, ckpt_dir = path, path.parent
    elif path.is_dir():
        ckpt_dir = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        weights = ckpt_dir / "last.ckpt"
    else:
        raise CheckpointError(f"no checkpoint at {path} (give a run folder, its checkpoints/ folder or a .ckpt file)")
    run_dir = ckpt_dir.parent if ckpt_dir.name == "checkpoints" else ckpt_dir
    recipe = next((p for p in (ckpt_dir / "recipe.yaml", run_dir / "recipe.yaml") if p.is_file()), None)
    files = CheckpointFiles(weights, recipe or run_dir / "recipe.yaml", run_dir / "tokenizer")
    missing = [
        f"{what} ({where})"
        for what, where, ok in (
            ("weights", files.weights, files.weights.is_file()),
            ("recipe", files.recipe, recipe is not None),
            ("tokenizer", files.tokenizer / "tokenizer.json", (files.tokenizer / "tokenizer.json").is_file()),
        )
        if not ok
    ]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete, missing: {'; '.join(missing)}")
    return files


def load_model(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[VisionLanguageModel, PreTrainedTokenizerBase, DictConfig]:
    """The trained model (eval mode), its tokenizer and its recipe."""
    files = locate(path)
    recipe = load_recipe(files.recipe)
    load_entry_point_plugins()
    import_modules(list(recipe.imports))
    tokenizer = load_tokenizer(files.tokenizer)
    model = VisionLanguageModel.from_recipe(OmegaConf.to_container(recipe.model, resolve=True), tokenizer)
    state = torch.load(files.weights, map_location="cpu", weights_only=True)
    if "state_dict" not in state:
        raise CheckpointError(f"{files.weights} is not a skipvision training checkpoint (no state_dict)")
    weights = {k[len(MODEL_PREFIX) :]: v for k, v in state["state_dict"].items() if k.startswith(MODEL_PREFIX)}
    model.load_state_dict(weights, strict=True)
    return model.to(device=device, dtype=dtype).eval(), tokenizer, recipe
