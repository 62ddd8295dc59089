"""One rank of the FSDP-versus-one-process test (tests/test_fsdp.py); run as a script, never collected by pytest.

Usage: ``python tests/fsdp_worker.py RANK WORLD OUT_DIR DATA_ROOT OVERRIDES_JSON`` with MASTER_ADDR / MASTER_PORT set.

Every rank builds the tiny Skip-Vision VLM (with the recipe overrides of OVERRIDES_JSON) as a skeleton on the meta
device, and :func:`skipvision.lit.fsdp.shard_and_load` shards it with skipvision's own FSDP2 code (one unit per encoder
block and decoder layer) and fills it from rank 0's fully built model; then each rank trains ``STEPS`` optimizer
steps on its own batch of :func:`batch`: in each step one rank's batch has images and a different number of kept FFN
rows, the other's is text only. It saves its per-step losses and, on rank 0, the final full state dict, to
``OUT_DIR``.
"""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from transformers import PreTrainedTokenizerBase

from skipvision.api import create_model
from skipvision.data.chat import encode_conversation
from skipvision.data.collate import collate
from skipvision.model import VisionLanguageModel
from skipvision.recipe import load_recipe
from skipvision.skeleton import skeleton

RECIPE = Path(__file__).resolve().parent / "recipes" / "tiny.yaml"
SKIP = ["model.skip.policy={name: attention_score, num_retained: 4}", "model.skip.num_skipped=4"]
STEPS = 3
LR = 0.1


def recipe_overrides(data_root: str, extra: list[str]) -> list[str]:
    return [f"data.root={data_root}", *SKIP, *extra]


def batch(step: int, rank: int, model: VisionLanguageModel, tokenizer: PreTrainedTokenizerBase) -> dict:
    """Rank ``(step % 2)`` gets 2 samples with 1 and 2 images; the other rank 2 text-only samples."""
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    gen = torch.Generator().manual_seed(100 * step + rank)
    if rank == step % 2:
        convs = [("<image>\nWhat colour is the circle?", "red", 1), ("<image>\n<image>\nHow many shapes?", "four", 2)]
    else:
        convs = [("Is a square round?", "no", 0), ("What is two and two?", "four", 0)]
    samples = []
    for question, answer, images in convs:
        turns = [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
        enc = encode_conversation(tokenizer, turns, model.num_image_tokens, images, image_id)
        pixels = [torch.randn(3, 32, 32, generator=gen) for _ in range(images)]
        sample = {"input_ids": enc.input_ids, "labels": enc.labels, "images": pixels}
        samples.append({**sample, "answer": answer, "qtype": "", "key": ""})
    return collate(samples, tokenizer.pad_token_id)


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    """SGD with momentum, not AdamW: some parameters' exact gradient is zero (the summary scorer's bias, attention key
    biases: softmax ignores a shift), and AdamW turns the float noise of a different summation order into full-size
    steps of random sign there; SGD keeps a 1e-5 difference a 1e-5 difference. (AdamW under FSDP is what
    tests/test_distributed.py runs.)"""
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)


def loss_of(model: VisionLanguageModel, b: dict) -> torch.Tensor:
    return model(b["input_ids"], b["attention_mask"], b.get("pixel_values"), b["num_images"], b["labels"]).loss


def main(rank: int, world: int, out_dir: Path, data_root: str, extra: list[str]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        from skipvision.lit.fsdp import shard_and_load

        cfg = load_recipe(RECIPE, recipe_overrides(data_root, extra))
        with skeleton():
            model, tokenizer = create_model(cfg)
        shard_and_load(model, lambda: create_model(cfg)[0], rank, world, torch.device("cpu"), "32-true")
        model.train().spmd = True
        optimizer = make_optimizer(model)
        losses = []
        for step in range(STEPS):
            optimizer.zero_grad(set_to_none=True)
            loss = loss_of(model, batch(step, rank, model, tokenizer))
            loss.backward()
            optimizer.step()
            losses.append(loss.detach().clone())
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        torch.save({"losses": losses, "state": state if rank == 0 else None}, out_dir / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]), sys.argv[4], json.loads(sys.argv[5]))
