"""``skipvision slurm`` and requeue/resume, against a real SLURM cluster.

The cluster is two fake nodes on this host (scripts/slurm-localhost; .ci/run starts it). Jobs are submitted with
the real sbatch and watched with ``scontrol show job`` (there is no accounting database); every job has a hard
deadline that fails the test, and is cancelled when its test ends. Without ``sinfo`` on PATH the cluster tests are
skipped, saying how to start the cluster; the script and option checks run everywhere.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from skipvision.cli import main
from skipvision.lit.run import resolve_resume
from skipvision.recipe import load_recipe

from .conftest import TINY_RECIPE

REPO = Path(__file__).resolve().parent.parent
JOB_PREFIX = "skipvision-test-"  # jobs of these tests; left-overs of an interrupted run are cancelled first
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
# What a 2-node x 1-task DDP fit on CPU needs here; validation is off (DDP validation is tested elsewhere).
DDP_OVERRIDES = [
    "trainer.devices=1",
    "trainer.strategy=ddp",
    "trainer.accelerator=cpu",
    "eval.generate=false",
    "trainer.limit_val_batches=0",
]
needs_cluster = pytest.mark.skipif(
    shutil.which("sinfo") is None,
    reason="no SLURM on this host (sinfo not on PATH); `bash scripts/slurm-localhost` starts a 2-node cluster here",
)


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err.removesuffix("\n")


def _sbatch_lines(script: str) -> list[str]:
    return [line for line in script.splitlines() if line.startswith("#SBATCH")]


# --- the script and the options (no cluster needed) -----------------------------------------------------------


def test_dry_run_writes_the_script_with_exact_sbatch_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    argv = ["slurm", "--recipe", str(TINY_RECIPE), "--nodes", "3", "--gpus-per-node", "2", "--time", "2-00:00:00"]
    argv += ["--partition", "gpu", "--requeue-signal-s", "90", "--dry-run", "trainer.devices=2", f"output_dir={out}"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    script = (out / "slurm" / "job.sbatch").read_text()
    assert captured.out == script
    assert captured.err == f"skipvision slurm: wrote {out / 'slurm' / 'job.sbatch'} (not submitted)\n"
    assert script.startswith("#!/bin/bash\n")
    assert _sbatch_lines(script) == [
        "#SBATCH --job-name=tiny",  # the recipe's name
        "#SBATCH --nodes=3",
        "#SBATCH --ntasks-per-node=2",  # = trainer.devices: one rank per device
        "#SBATCH --gpus-per-node=2",
        "#SBATCH --time=2-00:00:00",
        "#SBATCH --partition=gpu",
        f"#SBATCH --chdir={Path.cwd()}",  # the folder the command ran in
        f"#SBATCH --output={out}/slurm/%j.out",
        f"#SBATCH --error={out}/slurm/%j.err",
        "#SBATCH --open-mode=append",
        "#SBATCH --signal=USR1@90",
        "#SBATCH --requeue",
    ]
    assert "--ntasks=" not in script
    assert f"export PYTHONPATH={REPO}${{PYTHONPATH:+:$PYTHONPATH}}\n" in script
    [srun] = [line for line in script.splitlines() if line.startswith("srun ")]
    assert srun == (
        f"srun --kill-on-bad-exit=1 {sys.executable} -m skipvision fit --recipe {TINY_RECIPE} trainer.devices=2 "
        f"output_dir={out} trainer.num_nodes=3 checkpoint.resume=auto"
    )
    assert script.index("export MASTER_ADDR=") < script.index("srun ")


def test_dry_run_defaults_leave_out_gpus_and_partition(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(["slurm", "--recipe", str(TINY_RECIPE), "--dry-run", f"output_dir={out}", "trainer.num_nodes=2"]) == 0
    lines = _sbatch_lines(capsys.readouterr().out)
    assert lines[:4] == [
        "#SBATCH --job-name=tiny",
        "#SBATCH --nodes=2",  # --nodes defaults to the recipe's trainer.num_nodes
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --time=01:00:00",
    ]
    assert not any("--gpus" in line or "--partition" in line for line in lines)
    assert "#SBATCH --signal=USR1@120" in lines


@pytest.mark.parametrize(
    ("options", "overrides", "message"),
    [
        (["--nodes", "0"], [], "--nodes must be >= 1, got 0"),
        (
            ["--job-name", "bash"],
            [],
            "job name 'bash': Lightning treats a SLURM job named 'bash' or 'interactive' as interactive and every "
            "task would start its own ranks; choose another --job-name",
        ),
        ([], ["name=interactive"], "job name 'interactive': Lightning treats a SLURM job named 'bash' or"),
        (["--time", "1h"], [], "--time '1h' is not a SLURM time limit; use MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or"),
        (["--time", "1:00"], [], "--requeue-signal-s 120 is not shorter than --time 1:00 (60 s)"),
        ([], ["trainer.devices=auto"], "trainer.devices is 'auto'; a SLURM job needs the number of devices (= tasks)"),
        (["--gpus-per-node", "1"], ["trainer.devices=2"], "--gpus-per-node 1 is fewer than trainer.devices=2"),
        ([], ["checkpoint.resume=last"], "override 'checkpoint.resume=last': a SLURM job sets checkpoint.resume=auto"),
        ([], ["trainer.max_stepz=3"], "Unknown recipe key 'trainer.max_stepz'. Did you mean: max_steps?"),
    ],
)
def test_bad_options_fail_with_one_line(
    options: list[str], overrides: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["slurm", "--recipe", str(TINY_RECIPE), "--dry-run", *options, f"output_dir={tmp_path}", *overrides]
    assert main(argv) == 2
    assert _error_line(capsys).startswith(f"skipvision slurm: error: {message}")
    assert not (tmp_path / "slurm").exists()  # nothing written


def test_no_sbatch_on_path_fails_with_one_line_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert main(["slurm", "--recipe", str(TINY_RECIPE), f"output_dir={tmp_path / 'run'}"]) == 2
    assert _error_line(capsys) == (
        "skipvision slurm: error: sbatch not found on PATH: submit from a SLURM login node (bash "
        "scripts/slurm-localhost starts a local test cluster), or pass --dry-run to only write the script"
    )
    assert not (tmp_path / "run").exists()


def test_resume_auto_takes_the_newest_of_hpc_and_last_checkpoints(tmp_path: Path) -> None:
    cfg = load_recipe(TINY_RECIPE, ["checkpoint.resume=auto"])
    assert resolve_resume(cfg, tmp_path) is None  # nothing yet: a fresh start
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.parent.mkdir()
    hpc1, hpc2 = tmp_path / "hpc_ckpt_1.ckpt", tmp_path / "hpc_ckpt_2.ckpt"
    (tmp_path / ".requeue-hpc_ckpt_3.partial").write_bytes(b"")  # an interrupted save is never resumed from
    for age, path in ((30, hpc1), (20, last), (10, hpc2)):
        path.write_bytes(b"")
        os.utime(path, (time.time() - age, time.time() - age))
    assert resolve_resume(cfg, tmp_path) == str(hpc2)
    os.utime(last)  # last.ckpt written after the requeue's checkpoint
    assert resolve_resume(cfg, tmp_path) == str(last)
    hpc2.unlink()
    last.unlink()
    assert resolve_resume(cfg, tmp_path) == str(hpc1)


# --- real jobs ---------------------------------------------------------------------------------------------------


def job_info(job_id: str) -> dict[str, str]:
    """``scontrol show job -o``'s Key=Value fields ({} once SLURM has forgotten the job)."""
    done = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30)
    return dict(re.findall(r"(\w+)=(\S*)", done.stdout)) if done.returncode == 0 else {}


def _log_tail(out_dir: Path, job_id: str) -> str:
    logs = [out_dir / "slurm" / f"{job_id}.{ext}" for ext in ("out", "err")]
    return "\n".join(f"--- {p.name} ---\n{p.read_text()[-4000:]}" for p in logs if p.is_file())


def wait_for(
    job_id: str, out_dir: Path, done: Callable[[dict[str, str]], bool], timeout_s: float, what: str
) -> dict[str, str]:
    """Poll the job until ``done(info)``; fail the test (with the job's state and logs) after ``timeout_s`` or when
    the job ends without it."""
    deadline = time.monotonic() + timeout_s
    while True:
        info = job_info(job_id)
        if done(info):
            return info
        state = info.get("JobState", "gone")
        if state in TERMINAL or state == "gone" or time.monotonic() > deadline:
            reason = "timed out" if time.monotonic() > deadline else f"job ended ({state})"
            pytest.fail(
                f"job {job_id}: {reason} waiting for {what} ({timeout_s:.0f} s): {info}\n{_log_tail(out_dir, job_id)}"
            )
        time.sleep(0.3)


def finished(info: dict[str, str]) -> bool:
    return info.get("JobState") in TERMINAL


@pytest.fixture
def submit(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Iterator[Callable[..., str]]:
    """``submit(name, out_dir, *args)``: ``skipvision slurm`` for the tiny recipe, returning the job id; every job
    is cancelled when the test ends, however it ends."""
    _cancel_leftovers()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # two ranks on two cores; sbatch passes the environment on
    jobs: list[str] = []

    def _submit(name: str, out_dir: Path, *args: str) -> str:
        argv = ["slurm", "--recipe", str(TINY_RECIPE), "--job-name", JOB_PREFIX + name, "--time", "00:10:00"]
        assert main([*argv, *args, f"output_dir={out_dir}"]) == 0, capsys.readouterr().err
        job_id = capsys.readouterr().out.strip()
        assert job_id.isdigit(), job_id
        jobs.append(job_id)
        return job_id

    yield _submit
    for job_id in jobs:
        subprocess.run(["scancel", job_id], capture_output=True, timeout=30)


def _cancel_leftovers() -> None:
    listed = subprocess.run(["squeue", "-h", "-o", "%i %j"], capture_output=True, text=True, timeout=30).stdout
    for line in listed.splitlines():
        job_id, _, name = line.partition(" ")
        if name.startswith(JOB_PREFIX):
            subprocess.run(["scancel", job_id], capture_output=True, timeout=30)


def logged_steps(run: Path) -> list[list[int]]:
    """The training steps in each CSV log version of a run (one version per attempt), in version order."""
    versions = sorted((run / "logs").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    return [
        [int(row["step"]) for row in csv.DictReader(open(v / "metrics.csv")) if row.get("train/loss")] for v in versions
    ]


@needs_cluster
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_node_fit_runs_once_with_world_size_two(
    submit: Callable[..., str], tiny_overrides: list[str], tmp_path: Path, strategy: str
) -> None:
    start = time.monotonic()
    run = tmp_path / "run"
    args = [*DDP_OVERRIDES, f"trainer.strategy={strategy}", "trainer.max_steps=6", tiny_overrides[0]]
    job = submit(strategy, run, "--nodes", "2", *args)
    info = wait_for(job, run, finished, 120, "the job to finish")
    err = (run / "slurm" / f"{job}.err").read_text()
    out = (run / "slurm" / f"{job}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", _log_tail(run, job)
    assert info["JobName"] == JOB_PREFIX + strategy and info["NumNodes"] == "2"
    # The batch script found the first node's address (the fake node names do not resolve).
    assert re.search(rf"job {job} restart 0 on n\[1-2\], master 127\.0\.0\.1:\d+", out), out
    # One process group of two ranks, one per node: Lightning's SLURM environment, not two single-rank runs.
    assert "All distributed processes registered. Starting with 2 processes" in err
    assert err.count("Starting with 2 processes") == 1
    assert sorted(re.findall(r"GLOBAL_RANK: (\d), MEMBER: (\d)/2", err)) == [("0", "1"), ("1", "2")]
    # Exactly one run written: one log version, each step once, the step count of one run.
    assert logged_steps(run) == [[0, 1, 2, 3, 4, 5]]
    last = run / "checkpoints" / "last.ckpt"
    if strategy == "fsdp":  # a folder of shards, one per rank, and Lightning's metadata
        assert len(list(last.glob("*.distcp"))) == 2
        last = last / "meta.pt"
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 6
    assert not list(run.glob("hpc_ckpt_*.ckpt"))
    print(f"2-node {strategy} job: {time.monotonic() - start:.1f} s")


@needs_cluster
def test_usr1_saves_requeues_and_resumes_without_repeating_a_step(
    submit: Callable[..., str], tiny_overrides: list[str], tmp_path: Path
) -> None:
    start = time.monotonic()
    run = tmp_path / "run"
    max_steps = 30
    args = ["--nodes", "2", *DDP_OVERRIDES, f"trainer.max_steps={max_steps}", "checkpoint.every_n_steps=5"]
    job = submit("requeue", run, *args, tiny_overrides[0])
    # Training is under way (and the ranks' USR1 handler installed) once the first step checkpoint exists.
    wait_for(job, run, lambda _: (run / "checkpoints" / "step=5.ckpt").is_file(), 90, "step 5")
    # To the job's steps, where the ranks run (not --batch: the batch shell is not a rank); what --signal=USR1@s does.
    subprocess.run(["scancel", "--signal=USR1", job], check=True, capture_output=True, timeout=30)
    requeued = wait_for(job, run, lambda i: i.get("Restarts") == "1", 60, "the requeue")
    assert requeued["Requeue"] == "1"
    info = wait_for(job, run, finished, 150, "the requeued job to finish")
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0" and info["Restarts"] == "1", _log_tail(
        run, job
    )

    err = (run / "slurm" / f"{job}.err").read_text()
    out = (run / "slurm" / f"{job}.out").read_text()
    assert f"job {job} restart 0 on" in out and f"job {job} restart 1 on" in out  # both attempts appended
    [saved] = re.findall(r"Requeue signal: saved (\S+) at step (\d+)", err)
    hpc, saved_step = Path(saved[0]), int(saved[1])
    assert hpc == run / "hpc_ckpt_1.ckpt" and 5 <= saved_step < max_steps
    # The second attempt resumed from the newest checkpoint: the hpc one, or last.ckpt when the signal came at a step
    # checkpoint (every 5 steps), which is then written right after it, at the same step.
    [restored] = re.findall(r"Restoring states from the checkpoint path at (\S+)", err)
    same_step = [run / "checkpoints" / "last.ckpt"] if saved_step % 5 == 0 else []
    assert Path(restored) in [hpc, *same_step], (restored, saved_step)
    assert not list(run.glob(".requeue-*"))  # the temporary name was renamed

    # Both attempts' logs: the first stops right at the checkpoint, the second continues from it; nothing twice.
    first, second = logged_steps(run)
    assert first == list(range(saved_step))
    assert second == list(range(saved_step, max_steps))
    assert torch.load(hpc, map_location="cpu", weights_only=False)["global_step"] == saved_step
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == max_steps
    print(f"requeue job: {time.monotonic() - start:.1f} s (checkpoint at step {saved_step})")
