"""Build a model from a recipe in one call, as ``timm.create_model`` does from a name (docs/cli.md "Python API").

Training (skipvision/lit/run.py) and checkpoint loading (skipvision/inference/checkpoint.py) build the model the
same way: register the recipe's plugins, load the tokenizer, then ``VisionLanguageModel.from_recipe``. This is
that path without Lightning's jobs around it, for notebooks, new training loops and tests.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import PreTrainedTokenizerBase

from skipvision.data.tokenizer import load_tokenizer
from skipvision.model import VisionLanguageModel
from skipvision.recipe import build_recipe, load_recipe
from skipvision.registry import import_modules, load_entry_point_plugins


def create_model(
    recipe: str | Path | DictConfig,
    overrides: list[str] | None = None,
    *,
    tokenizer: str | Path | PreTrainedTokenizerBase | None = None,
) -> tuple[VisionLanguageModel, PreTrainedTokenizerBase]:
    """A freshly initialised model of a recipe (a file, a shipped recipe's name or a loaded recipe) and its
    tokenizer.

    ``overrides`` are ``key=value`` recipe overrides (``model.skip.num_skipped=8``). ``tokenizer``: a tokenizer or
    its folder; by default the recipe's own, prepared as ``fit`` prepares it (``data.tokenizer``, else
    ``<data.root>/tokenizer``, generating the synthetic shapes set there when it is missing). The weights are
    initialised under the recipe's ``seed`` exactly as ``fit`` initialises them. For a trained model use
    ``VLMGenerator.from_checkpoint`` (or ``skipvision.inference.checkpoint.load_model``).
    """
    if isinstance(recipe, DictConfig):
        cfg = build_recipe(OmegaConf.to_container(recipe, resolve=True), overrides) if overrides else recipe
    else:
        cfg = load_recipe(recipe, overrides)
    load_entry_point_plugins()
    import_modules(list(cfg.imports))
    if tokenizer is None:
        from skipvision.lit.run import prepare_data  # Lightning comes with it; only this default needs it

        tokenizer = prepare_data(cfg)
    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        tokenizer = load_tokenizer(tokenizer)
    torch.manual_seed(cfg.seed)
    model = VisionLanguageModel.from_recipe(OmegaConf.to_container(cfg.model, resolve=True), tokenizer)
    return model, tokenizer
