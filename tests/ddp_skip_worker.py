"""One rank of the DDP + Skip-FFN test (tests/test_ddp_skip.py); run as a script, never collected by pytest.

Usage: ``python tests/ddp_skip_worker.py RANK WORLD OUT_DIR KEEP_JSON`` with MASTER_ADDR / MASTER_PORT set.
``KEEP_JSON`` is a list over steps of per-rank kept-row counts, e.g. ``[[7, 0], [16, 3], [0, 11]]``.

Each rank builds the same tiny random Llama, wraps it in DDP (gloo, CPU, ``find_unused_parameters=False``),
attaches :class:`SkipFFN` to the wrapped module and trains a few AdamW steps on its own batch with its own plan.
Per step it saves to ``OUT_DIR/rank{RANK}.pt``: the rows each ``mlp.gate_proj`` call received (pre-hook), the
local gradients of a plain (non-DDP) replica fed the same batch and plan, the DDP (all-reduced) gradients, and the
parameters after the optimizer step. It also asserts in-process that every MLP was called once per step with
exactly the planned number of rows, zero included.
"""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from transformers import AutoConfig, AutoModelForCausalLM

from skipvision.adapters import decoder_layers
from skipvision.skip.ffn import SkipFFN

B, T, VOCAB = 2, 8, 50


def tiny_llama() -> nn.Module:
    """The same tiny random Llama on every rank (fixed seed, fp32, train mode, eager attention)."""
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(
        "llama",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=VOCAB,
        max_position_embeddings=64,
    )
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").train()


def batch_and_plan(step: int, rank: int, n_keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's [B, T] token ids and a [B, T] bool plan keeping ``n_keep`` random rows, seeded by (step, rank)."""
    g = torch.Generator().manual_seed(1000 * step + rank + 1)
    ids = torch.randint(0, VOCAB, (B, T), generator=g)  # [B, T]
    plan = torch.zeros(B * T, dtype=torch.bool)  # [B*T]
    plan[torch.randperm(B * T, generator=g)[:n_keep]] = True
    return ids, plan.reshape(B, T)  # [B, T], [B, T]


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of every parameter's gradient (a missing gradient would raise: DDP must produce all)."""
    out = {}
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} has no gradient"
        out[name] = p.grad.detach().clone()
    return out


def main(rank: int, world: int, out_dir: Path, keep: list[list[int]]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=30))
    try:
        model = tiny_llama()
        ddp = DistributedDataParallel(model, find_unused_parameters=False)
        opt = torch.optim.AdamW(ddp.parameters(), lr=1e-2)
        reference = tiny_llama()  # plain replica: this rank's local (pre-all-reduce) gradients

        rows: dict[int, list[int]] = {}
        for i, layer in enumerate(decoder_layers(model)):
            rows[i] = []

            def pre_hook(_: nn.Module, args: tuple[torch.Tensor, ...], i: int = i) -> None:
                rows[i].append(args[0].shape[:-1].numel())

            layer.mlp.gate_proj.register_forward_pre_hook(pre_hook)

        steps = []
        with SkipFFN(model) as skip, SkipFFN(reference) as ref_skip:
            for step, per_rank in enumerate(keep):
                n_keep = per_rank[rank]
                ids, plan = batch_and_plan(step, rank, n_keep)

                reference.load_state_dict(model.state_dict())
                reference.zero_grad(set_to_none=True)
                ref_skip.set_plan(plan)
                reference(input_ids=ids, labels=ids).loss.backward()
                local = grads(reference)

                for r in rows.values():
                    r.clear()
                opt.zero_grad(set_to_none=True)
                skip.set_plan(plan)
                ddp(input_ids=ids, labels=ids).loss.backward()
                reduced = grads(model)
                opt.step()

                # The control: every MLP ran exactly once on this rank, on exactly the planned rows (0 included).
                counts = {i: list(r) for i, r in rows.items()}
                assert all(c == [n_keep] for c in counts.values()), (rank, step, n_keep, counts)
                steps.append(
                    {
                        "n_keep": n_keep,
                        "plan_rows": int(plan.sum()),
                        "rows": counts,
                        "local_grads": local,
                        "ddp_grads": reduced,
                        "params": {k: v.detach().clone() for k, v in model.state_dict().items()},
                    }
                )
        dist.barrier()
        torch.save(steps, out_dir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]), json.loads(sys.argv[4]))
