"""FSDP2 against one process on the same global batch (docs/distributed.md "FSDP").

Two gloo ranks (tests/fsdp_worker.py) shard the tiny Skip-Vision VLM with skipvision's FSDP code and train three
SGD steps, one rank's batch with images (a different number of kept FFN rows per step), the other's text only.
One process here trains the same model on both batches with the mean of the two losses, which is the objective
FSDP's averaged gradients optimise. Losses (each rank's) and the final weights must match (fp32, 1e-5).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from skipvision.api import create_model
from skipvision.data.tokenizer import load_tokenizer
from skipvision.recipe import load_recipe

from .conftest import tiny_lm_config
from .fsdp_worker import RECIPE, STEPS, batch, loss_of, make_optimizer, recipe_overrides
from .processes import TESTS, free_port, process_env, run_all

WORLD = 2
TIMEOUT_S = 120.0


def saved_tied_llama(tiny_shapes: Path, folder: Path) -> Path:
    """A tiny Llama saved as a pretrained checkpoint, its input embeddings tied to its LM head."""
    config = tiny_lm_config(vocab_size=len(load_tokenizer(tiny_shapes / "tokenizer")), tie_word_embeddings=True)
    torch.manual_seed(5)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("backbone", ["config", "pretrained_tied"])
def test_fsdp_losses_and_weights_equal_one_process_on_the_global_batch(
    tiny_shapes: Path, tmp_path: Path, backbone: str
) -> None:
    """``config``: the recipe's backbone built from a config. ``pretrained_tied``: loaded from a saved checkpoint (the
    skeleton reads its config only; rank 0 reads the weights), with tied embeddings sharded as one unit."""
    extra = []
    if backbone == "pretrained_tied":
        llm = saved_tied_llama(tiny_shapes, tmp_path / "llm")
        extra = ["model.backbone.config=null", f"model.backbone.path={llm}"]
    env = process_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    worker = str(TESTS / "fsdp_worker.py")
    commands = [
        [sys.executable, worker, str(r), str(WORLD), str(tmp_path), str(tiny_shapes), json.dumps(extra)]
        for r in range(WORLD)
    ]
    run_all(commands, [tmp_path / f"rank{r}.log" for r in range(WORLD)], TIMEOUT_S, env)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]

    model, tokenizer = create_model(load_recipe(RECIPE, recipe_overrides(str(tiny_shapes), extra)))
    if backbone == "pretrained_tied":
        assert model.backbone.get_output_embeddings().weight is model.backbone.get_input_embeddings().weight
    model.train()
    optimizer = make_optimizer(model)
    for step in range(STEPS):
        optimizer.zero_grad(set_to_none=True)
        losses = [loss_of(model, batch(step, r, model, tokenizer)) for r in range(WORLD)]
        torch.stack(losses).mean().backward()
        optimizer.step()
        for r in range(WORLD):
            torch.testing.assert_close(ranks[r]["losses"][step], losses[r].detach(), rtol=1e-5, atol=0)
    sharded = ranks[0]["state"]
    assert sharded.keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(sharded[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
