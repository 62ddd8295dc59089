"""Load a trained model from a run folder without Lightning, for generation and the Python API.

A run folder (``output_dir`` of ``fit``) holds ``recipe.yaml``, ``tokenizer/`` and ``checkpoints/*.ckpt``. Any of
these resolves to the same three files: the run folder, its ``checkpoints/`` folder, or one ``.ckpt`` in it. A
``.ckpt`` is a file, or with FSDP a folder of shards (PyTorch distributed checkpoint), read here in one process
(docs/distributed.md "Checkpoints"). The model is rebuilt from the recipe exactly as training built it, then the
checkpoint's weights are loaded strictly (a missing or unexpected tensor is an error, never a silently half-loaded
model). :func:`consolidate` writes a checkpoint's model weights as one safetensors file.

An HF LLaVA folder (``LlavaForConditionalGeneration``, with its tokenizer) also loads, without training: the full
model, or a training-free method given as a skip spec (``fastv``, ``merge_only``; docs/checkpoints.md "Generating
from a LLaVA folder").
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from transformers import PreTrainedTokenizerBase

from skipvision.data.samples import IMAGE_PLACEHOLDER
from skipvision.data.tokenizer import load_tokenizer, prepare_tokenizer
from skipvision.errors import SkipvisionError, UnsupportedModelError
from skipvision.model import VisionLanguageModel
from skipvision.recipe import build_recipe, load_recipe
from skipvision.registry import import_modules, load_entry_point_plugins
from skipvision.weights.llava import TOWERS, llava_config

MODEL_PREFIX = "model."  # VLMLitModule keeps the VisionLanguageModel under .model


class CheckpointError(SkipvisionError, FileNotFoundError):
    """A checkpoint path is missing files the model needs."""


def is_sharded(path: Path) -> bool:
    """Whether ``path`` is a sharded checkpoint folder (FSDP), as opposed to a Lightning ``.ckpt`` file."""
    return path.is_dir() and (path / ".metadata").is_file()


@dataclass
class CheckpointFiles:
    weights: Path  # a Lightning .ckpt file, or a folder of shards
    recipe: Path  # the resolved recipe the model was trained with
    tokenizer: Path  # folder with tokenizer.json


def locate(path: str | Path) -> CheckpointFiles:
    """Resolve a run folder, its ``checkpoints/`` folder or a ``.ckpt`` file; name every missing file."""
    path = Path(path)
    if path.is_file() or is_sharded(path):
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
            ("weights", files.weights, files.weights.is_file() or is_sharded(files.weights)),
            ("recipe", files.recipe, recipe is not None),
            ("tokenizer", files.tokenizer / "tokenizer.json", (files.tokenizer / "tokenizer.json").is_file()),
        )
        if not ok
    ]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete, missing: {'; '.join(missing)}")
    return files


def load_llava_folder(
    path: str | Path, skip: Mapping[str, Any] | None = None
) -> tuple[VisionLanguageModel, PreTrainedTokenizerBase]:
    """An HF LLaVA folder as a model (its three parts, docs/checkpoints.md "LLaVA folders") and its tokenizer;
    ``skip`` is a ``model.skip`` section (default: the full model)."""
    config = llava_config(path)
    if config is None:
        raise CheckpointError(f"{path} is not an HF LLaVA folder (config.json with model_type llava)")
    tower = TOWERS.get(config.get("vision_config", {}).get("model_type", "clip_vision_model"))
    if tower is None:
        raise UnsupportedModelError(
            f"{path}: vision tower {config['vision_config']['model_type']!r} is not supported; "
            f"supported: {', '.join(TOWERS)}"
        )
    tokenizer = load_tokenizer(path)
    prepare_tokenizer(tokenizer, "tokenizer" if tokenizer.chat_template else "llava_v1")  # else LLaVA-1.5's layout
    image_id = config.get("image_token_id", config.get("image_token_index"))
    if tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER) != image_id:
        raise CheckpointError(
            f"{path}: the tokenizer's {IMAGE_PLACEHOLDER} is id {tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)} "
            f"but config.json says image_token_id {image_id}"
        )
    parts = ({"name": tower, "path": str(path)}, {"name": "mlp2x_gelu", "weights": str(path)})
    backbone = {"name": "hf_causal_lm", "path": str(path)}
    model = VisionLanguageModel.from_specs(*parts, backbone, tokenizer, IMAGE_PLACEHOLDER, skip=skip)
    if model.visual.layout.skips or any(True for _ in model.visual.parameters()):
        raise CheckpointError(
            f"{path}: skip policy {type(model.visual.policy).__name__} needs training (new summary tokens or a learned "
            "score); an untrained LLaVA folder runs the full model or a training-free method (fastv, merge_only)"
        )
    return model.eval(), tokenizer


def load_model(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    skip: Mapping[str, Any] | None = None,
) -> tuple[VisionLanguageModel, PreTrainedTokenizerBase, DictConfig | None]:
    """The trained model (eval mode), its tokenizer and its recipe, from a run or an export folder
    (skipvision/inference/export.py); for an HF LLaVA folder, the model ``skip`` describes (default: full) and no
    recipe. ``skip`` is only for LLaVA folders: a run has its own."""
    if llava_config(path) is not None:
        model, tokenizer = load_llava_folder(path, skip)
        return model.to(device=device, dtype=dtype), tokenizer, None
    from skipvision.inference.export import is_export, load_export  # export builds on this module

    if is_export(path) and skip is None:
        model, tokenizer, recipe = load_export(path)
        return model.to(device=device, dtype=dtype), tokenizer, recipe
    if skip is not None:
        raise CheckpointError(
            f"{path} is a training run: its skip settings are its recipe's; --policy is for HF LLaVA folders"
        )
    files = locate(path)
    weights, stored = read_checkpoint(files.weights)
    folder_recipe = load_recipe(files.recipe)
    recipe = folder_recipe if stored is None else build_recipe(stored)
    if stored is not None and OmegaConf.to_container(folder_recipe) != OmegaConf.to_container(recipe):
        warnings.warn(
            f"{files.recipe} differs from the recipe stored in {files.weights}; using the checkpoint's own",
            stacklevel=2,
        )
    load_entry_point_plugins()
    import_modules(list(recipe.imports))
    tokenizer = load_tokenizer(files.tokenizer)
    model = VisionLanguageModel.from_recipe(OmegaConf.to_container(recipe.model, resolve=True), tokenizer)
    model.load_state_dict(weights, strict=True)
    return model.to(device=device, dtype=dtype).eval(), tokenizer, recipe


def read_sharded(folder: Path, prefix: str) -> dict[str, torch.Tensor]:
    """The tensors of a sharded checkpoint whose key starts with ``prefix`` (``state_dict.`` for the weights,
    ``optimizer_0.state.`` for the optimizer's), gathered from every rank's shards in one process; nothing else is
    read. Keys are returned without the prefix."""
    metadata = FileSystemReader(folder).read_metadata().state_dict_metadata
    wanted = {
        key: torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in metadata.items()
        if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata)
    }
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(wanted, checkpoint_id=folder, no_dist=True)
    return {key[len(prefix) :]: tensor for key, tensor in wanted.items()}


def read_checkpoint(weights: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """The ``VisionLanguageModel`` state dict of a training checkpoint (a ``.ckpt`` file or a sharded folder) and
    the recipe stored in it (None when it has none): a checkpoint describes itself (docs/runs.md "Run folders").
    Only safe loading (``weights_only``); a file that is not a checkpoint says so in one line."""
    recipe = None
    if is_sharded(weights):
        state = read_sharded(weights, "state_dict.")
        meta = weights / "meta.pt"
        if meta.is_file():
            recipe = _safe_load(meta).get("hyper_parameters", {}).get("recipe")
    else:
        loaded = _safe_load(weights)
        state = loaded.get("state_dict")
        recipe = loaded.get("hyper_parameters", {}).get("recipe")
    if not state:
        raise CheckpointError(f"{weights} is not a skipvision training checkpoint (no state_dict)")
    return {k[len(MODEL_PREFIX) :]: v for k, v in state.items() if k.startswith(MODEL_PREFIX)}, recipe


def _safe_load(path: Path) -> dict[str, Any]:
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several kinds; all mean "not a checkpoint we can read safely"
        kind = type(err).__name__
        raise CheckpointError(
            f"{path} is not a readable checkpoint ({kind}: {str(err).splitlines()[0][:120]})"
        ) from None
    if not isinstance(loaded, dict):
        raise CheckpointError(f"{path} is not a checkpoint (it holds a {type(loaded).__name__})")
    return loaded


def model_weights(weights: Path) -> dict[str, torch.Tensor]:
    """The ``VisionLanguageModel`` state dict of a training checkpoint (see :func:`read_checkpoint`)."""
    return read_checkpoint(weights)[0]


def consolidate(path: str | Path, out: str | Path) -> int:
    """Write the model weights of a checkpoint (a run folder, a ``.ckpt`` file or an FSDP shard folder) to one
    safetensors file ``out``; returns the number of tensors."""
    weights = model_weights(locate(path).weights)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous().clone() for k, v in weights.items()}, out)  # clone: safetensors refuses shared
    return len(weights)
