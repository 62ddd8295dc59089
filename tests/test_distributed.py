"""Multi-process fits that must never hang: 2 CPU ranks with gloo, through the real CLI and Lightning's launcher.

docs/distributed.md "SPMD" and "Data": one validation shard for two ranks, a text-only batch on one rank, question
types only one rank sees, and 2 "nodes" of one process each. Each run has a deadline that fails the test (and kills
every rank) instead of hanging CI. The 2-rank validation must equal a single-process validation of the same
checkpoint: every sample counted once, fillers counted never.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
import webdataset as wds
from safetensors.torch import load_file

from skipvision.cli import main
from skipvision.data.shapes import QUESTION_TYPES
from skipvision.inference import VLMGenerator
from skipvision.inference.checkpoint import model_weights, read_sharded
from skipvision.lit.run import validate
from skipvision.recipe import load_recipe

from .conftest import TINY_RECIPE
from .processes import free_port, process_env, run_all, run_cli

TIMEOUT_S = 240.0
RARE = "rare"  # a question type only the first validation sample has, so only rank 0 ever sees it


def raw_samples(shard: Path) -> list[dict]:
    pipeline = wds.DataPipeline(wds.SimpleShardList([str(shard)]), wds.tarfile_to_samples())
    return [{k: v for k, v in s.items() if k in ("__key__", "json", "png")} for s in pipeline]


def write_shard(path: Path, samples: list[dict]) -> Path:
    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)
    return path


def with_json(sample: dict, **changes: object) -> dict:
    meta = json.loads(sample["json"])
    meta.update(changes)
    return {**sample, "json": json.dumps(meta).encode()}


def text_only(sample: dict) -> dict:
    """The sample without its image: the placeholder leaves the first turn."""
    meta = json.loads(sample["json"])
    first = meta["conversations"][0]
    first["value"] = first["value"].replace("<image>\n", "").replace("<image>", "")
    return {"__key__": sample["__key__"] + "_text", "json": json.dumps(meta).encode()}


@pytest.fixture(scope="module")
def shards(tiny_shapes: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A validation shard of 23 samples whose first has the type ``rare``; an image-only and a text-only training
    shard."""
    out = tmp_path_factory.mktemp("shards")
    val = raw_samples(next((tiny_shapes / "val").glob("*.tar")))[:23]  # odd: one rank's share gets a filler
    val[0] = with_json(val[0], qtype=RARE)
    train = raw_samples(sorted((tiny_shapes / "train").glob("*.tar"))[0])
    return {
        "val": write_shard(out / "val-rare.tar", val),
        "images": write_shard(out / "train-images.tar", train),
        "text": write_shard(out / "train-text.tar", [text_only(s) for s in train]),
    }


def overrides(tiny_shapes: Path, shards: dict[str, Path], run: Path, *extra: str) -> list[str]:
    return [
        f"data.root={tiny_shapes}",
        f"output_dir={run}",
        f"data.val_shards={shards['val']}",
        f"eval.question_types=[{','.join((*QUESTION_TYPES, RARE))}]",
        "trainer.limit_val_batches=null",  # all 23: rank 0 reads 12 (8 + 4), rank 1 11 + a filler (8 + 4)
        "trainer.accelerator=cpu",
        "eval.max_new_tokens=3",
        *extra,
    ]


def metrics(run: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(open(run / "logs" / "version_0" / "metrics.csv")))


def logged(rows: list[dict[str, str]], prefix: str) -> dict[str, float]:
    return {k: float(v) for r in rows for k, v in r.items() if k.startswith(prefix) and v}


@pytest.fixture(scope="module")
def two_rank_run(tiny_shapes: Path, shards: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("ddp") / "run"
    args = overrides(tiny_shapes, shards, run, "trainer.devices=2", "trainer.strategy=ddp")
    run_cli(["fit", "--recipe", str(TINY_RECIPE), *args], run.parent / "fit.log", TIMEOUT_S)
    return run


def test_two_ranks_one_val_shard_validate_every_sample_once(
    two_rank_run: Path, tiny_shapes: Path, shards: dict[str, Path]
) -> None:
    rows = metrics(two_rank_run)
    assert [int(r["step"]) for r in rows if r["train/loss"]] == [0, 1]  # one run, each step once
    two_ranks = logged(rows, "val/")
    cfg = load_recipe(TINY_RECIPE, overrides(tiny_shapes, shards, two_rank_run.parent / "validate"))
    (single,) = validate(cfg, str(two_rank_run / "checkpoints" / "last.ckpt"))
    # Declared up front: every type has its metric on both ranks; "rare" got its one sample from rank 0 only.
    accuracies = {f"val/acc_{t}" for t in ("all", *QUESTION_TYPES, RARE)}
    assert set(two_ranks) == {"val/loss", "val/data_skipped", *accuracies}
    assert two_ranks["val/data_skipped"] == 0
    assert two_ranks["val/acc_rare"] in (0.0, 1.0)
    for key, value in two_ranks.items():
        assert single[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


# Skip-Vision on, two training shards for two readers: each rank reads one per pass, so one rank's batches never hold
# an image while the other's keep a different number of FFN rows per batch.
SKIP_MIXED = [
    "model.skip.policy={name: attention_score, num_retained: 4}",
    "model.skip.num_skipped=4",
    "data.resampled=false",
    "data.epoch_batches=2",
    "trainer.max_steps=3",
    "trainer.devices=2",
]


def fit_mixed(tiny_shapes: Path, shards: dict[str, Path], run: Path, *extra: str) -> Path:
    train = f"data.train_shards={shards['images'].parent}/train-{{images,text}}.tar"
    args = overrides(tiny_shapes, shards, run, train, *SKIP_MIXED, *extra)
    run_cli(["fit", "--recipe", str(TINY_RECIPE), *args], run.parent / f"{run.name}-fit.log", TIMEOUT_S)
    return run


@pytest.fixture(scope="module")
def ddp_mixed(tiny_shapes: Path, shards: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fit_mixed(tiny_shapes, shards, tmp_path_factory.mktemp("ddp_mixed") / "run", "trainer.strategy=ddp")


@pytest.fixture(scope="module")
def fsdp_mixed(tiny_shapes: Path, shards: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fit_mixed(tiny_shapes, shards, tmp_path_factory.mktemp("fsdp_mixed") / "run", "trainer.strategy=fsdp")


def test_two_ranks_with_a_text_only_batch_on_one_rank(ddp_mixed: Path) -> None:
    rows = metrics(ddp_mixed)
    assert [int(r["step"]) for r in rows if r["train/loss"]] == [0, 1, 2]
    assert {int(r["epoch"]) for r in rows if r["train/loss"]} == {0, 1}  # epochs of 2 batches per rank


def test_fsdp_equals_ddp_and_consolidates_to_the_same_weights(ddp_mixed: Path, fsdp_mixed: Path) -> None:
    """docs/distributed.md "FSDP": sharded per layer and block, built on the meta device and filled from rank 0, the
    same run gives DDP's losses and metrics (fp32, 1e-5) and, consolidated from its shards, DDP's weights."""
    fsdp, ddp = metrics(fsdp_mixed), metrics(ddp_mixed)
    losses = [float(r["train/loss"]) for r in fsdp if r["train/loss"]]
    assert losses == pytest.approx([float(r["train/loss"]) for r in ddp if r["train/loss"]], rel=1e-5)
    assert logged(fsdp, "val/") == pytest.approx(logged(ddp, "val/"), rel=1e-5, abs=1e-6)
    last = fsdp_mixed / "checkpoints" / "last.ckpt"
    assert (last / ".metadata").is_file() and len(list(last.glob("*.distcp"))) == 2  # one shard file per rank

    out = fsdp_mixed.parent / "model.safetensors"
    assert main(["consolidate", "--checkpoint", str(fsdp_mixed), "--out", str(out)]) == 0
    merged = load_file(out)
    reference = model_weights(ddp_mixed / "checkpoints" / "last.ckpt")
    assert merged.keys() == reference.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(merged[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def test_a_sharded_checkpoint_outside_fsdp_is_one_clear_line(
    fsdp_mixed: Path, tiny_shapes: Path, shards: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    last = fsdp_mixed / "checkpoints" / "last.ckpt"
    args = overrides(tiny_shapes, shards, fsdp_mixed.parent / "other", *SKIP_MIXED[:2])
    assert main(["validate", "--recipe", str(TINY_RECIPE), "--checkpoint", str(last), *args]) == 2
    assert capsys.readouterr().err.strip() == (
        f"skipvision validate: error: {last} is a sharded FSDP checkpoint: use it with trainer.strategy=fsdp (any "
        "number of devices), or write its weights to one file with `skipvision consolidate`"
    )


def test_fsdp_resumes_from_its_sharded_checkpoint(
    fsdp_mixed: Path, tiny_shapes: Path, shards: dict[str, Path], tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(fsdp_mixed, run)
    fit_mixed(tiny_shapes, shards, run, "trainer.strategy=fsdp", "trainer.max_steps=5", "checkpoint.resume=last")
    resumed = list(csv.DictReader(open(run / "logs" / "version_1" / "metrics.csv")))
    assert [int(r["step"]) for r in resumed if r["train/loss"]] == [3, 4]  # the step count continues
    state = read_sharded(run / "checkpoints" / "last.ckpt", "optimizer_0.state.")
    steps = {float(value) for key, value in state.items() if key.endswith(".step")}
    assert steps == {5.0}  # AdamW's own step counts came back with the shards (a fresh optimizer would say 2)


def test_two_nodes_of_one_process_match_one_node_of_two(
    two_rank_run: Path, tiny_shapes: Path, shards: dict[str, Path], tmp_path: Path
) -> None:
    run = tmp_path / "run"
    args = overrides(tiny_shapes, shards, run, "trainer.devices=1", "trainer.num_nodes=2", "trainer.strategy=ddp")
    command = [sys.executable, "-m", "skipvision", "fit", "--recipe", str(TINY_RECIPE), *args]
    port = str(free_port())
    envs = [process_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, NODE_RANK=str(n)) for n in range(2)]
    logs = [tmp_path / f"node{n}.log" for n in range(2)]
    # Both "nodes" run on this host; each reads its node rank from NODE_RANK, as on a real cluster without SLURM.
    run_all([command, command], logs, TIMEOUT_S, envs)
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in logs[1].read_text()
    nodes, one_node = metrics(run), metrics(two_rank_run)
    losses = [float(r["train/loss"]) for r in nodes if r["train/loss"]]
    assert losses == pytest.approx([float(r["train/loss"]) for r in one_node if r["train/loss"]], rel=1e-6)
    assert logged(nodes, "val/") == pytest.approx(logged(one_node, "val/"), rel=1e-5)


def test_a_sharded_fsdp_run_exports_like_any_run(fsdp_mixed: Path) -> None:
    """docs/checkpoints.md "Export": the export reads the shards in one process; its weights are the run's."""
    out = fsdp_mixed.parent / "export"
    assert main(["export", "--checkpoint", str(fsdp_mixed), "--out", str(out)]) == 0
    exported = VLMGenerator.from_checkpoint(out).model.state_dict()
    weights = model_weights(fsdp_mixed / "checkpoints" / "last.ckpt")
    assert exported.keys() == weights.keys()
    assert all(torch.equal(exported[k], v) for k, v in weights.items())


ROUTER = ["model.skip.policy=mod_router"]  # a name replaces the mixed runs' policy


@pytest.fixture(scope="module")
def ddp_router(tiny_shapes: Path, shards: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fit_mixed(
        tiny_shapes, shards, tmp_path_factory.mktemp("ddp_router") / "run", *ROUTER, "trainer.strategy=ddp"
    )


def test_mod_router_trains_under_ddp_with_a_text_only_batch_on_one_rank(ddp_router: Path) -> None:
    """SPMD (docs/distributed.md "SPMD"): a rank whose batch has no image still runs every layer's router, so DDP
    reduces every router's gradient on every step instead of failing or hanging."""
    rows = metrics(ddp_router)
    assert [int(r["step"]) for r in rows if r["train/loss"]] == [0, 1, 2]
    assert all(math.isfinite(float(r["train/loss"])) for r in rows if r["train/loss"])


def test_mod_router_under_fsdp_equals_ddp(
    ddp_router: Path, tiny_shapes: Path, shards: dict[str, Path], tmp_path: Path
) -> None:
    """The routers, called from the decoder layers' hooks, are FSDP units of their own: the same losses as DDP."""
    fsdp = metrics(fit_mixed(tiny_shapes, shards, tmp_path / "run", *ROUTER, "trainer.strategy=fsdp"))
    losses = [float(r["train/loss"]) for r in fsdp if r["train/loss"]]
    assert losses == pytest.approx([float(r["train/loss"]) for r in metrics(ddp_router) if r["train/loss"]], rel=1e-5)
