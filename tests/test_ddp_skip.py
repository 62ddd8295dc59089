"""DDP + Skip-FFN with ranks that keep different numbers of FFN rows, zero included.

docs/method.md "The Skip-FFN layer": the FFN is called even with zero kept rows.

Guards against the classic conditional-compute failure: if a rank whose plan keeps no FFN rows skipped calling the
MLP, its MLP parameters would get no gradient, DDP's gradient buckets would never be ready on that rank and the
all-reduce would hang or error (``find_unused_parameters=False``), or the ranks would silently diverge. Two gloo
ranks on CPU (tests/ddp_skip_worker.py) train a tiny Llama for three AdamW steps with different plans per rank;
the test checks that the run finishes, that parameters and gradients stay identical across ranks, that the MLP
gradients are the average of both ranks' local gradients (the zero-row rank contributing exact zeros), and that a
pre-hook on every ``mlp.gate_proj`` saw exactly the planned number of rows on every rank in every step.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from .processes import TESTS, free_port, process_env, run_all

WORKER = TESTS / "ddp_skip_worker.py"
WORLD = 2
# Kept FFN rows (of B*T = 16) per step, per rank: rank 1 keeps none in step 0, rank 0 keeps none in step 2.
KEEP = ((7, 0), (16, 3), (0, 11))
TIMEOUT_S = 35.0  # whole run, both ranks; the process group itself times out after 30 s


def run_ranks(out_dir: Path) -> None:
    """Run the worker on ``WORLD`` ranks; kill them all and fail on a timeout or any nonzero exit."""
    env = process_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    commands = [[sys.executable, str(WORKER), str(r), str(WORLD), str(out_dir), json.dumps(KEEP)] for r in range(WORLD)]
    run_all(commands, [out_dir / f"rank{r}.log" for r in range(WORLD)], TIMEOUT_S, env)


def test_ddp_ranks_with_different_and_empty_skip_plans_stay_in_sync(tmp_path: Path) -> None:
    start = time.monotonic()
    run_ranks(tmp_path)
    assert time.monotonic() - start < TIMEOUT_S
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    assert all(len(steps) == len(KEEP) for steps in results)

    for step, keep in enumerate(KEEP):
        per_rank = [steps[step] for steps in results]
        # The control: a pre-hook on every mlp.gate_proj fired once per step on every rank with the planned rows.
        for r, res in enumerate(per_rank):
            assert res["n_keep"] == res["plan_rows"] == keep[r]
            assert res["rows"] == {0: [keep[r]], 1: [keep[r]]}, (step, r, res["rows"])

        first, other = per_rank
        # DDP all-reduced gradients, so every rank holds the same gradients and, after AdamW, the same parameters.
        for name, g in first["ddp_grads"].items():
            assert torch.equal(g, other["ddp_grads"][name]), (step, name)
        for name, p in first["params"].items():
            assert torch.equal(p, other["params"][name]), (step, name)

        # Each DDP gradient is the average of the ranks' local gradients.
        for name, g in first["ddp_grads"].items():
            mean = sum(res["local_grads"][name] for res in per_rank) / WORLD
            torch.testing.assert_close(g, mean, rtol=1e-5, atol=1e-7, msg=f"step {step} {name}")

        # A rank with no kept rows contributed exact-zero MLP gradients, and still got the other rank's half of them.
        mlp = [n for n in first["ddp_grads"] if ".mlp." in n]
        assert len(mlp) == 6  # gate/up/down of 2 layers
        for r, res in enumerate(per_rank):
            if keep[r] != 0:
                continue
            busy = per_rank[1 - r]
            for name in mlp:
                assert torch.count_nonzero(res["local_grads"][name]) == 0, (step, r, name)
                assert torch.count_nonzero(busy["local_grads"][name]) > 0, (step, r, name)
                torch.testing.assert_close(res["ddp_grads"][name], busy["local_grads"][name] / WORLD)
