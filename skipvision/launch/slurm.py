"""A recipe -> an sbatch script that trains it on N nodes under ``srun``, and its submission (``skipvision slurm``).

The script asks SLURM for ``--nodes`` N with ``--ntasks-per-node`` = ``trainer.devices`` (Lightning's
SLURMEnvironment takes its world size, ranks and node count from srun's variables and rejects ``--ntasks``), names
the job (never ``bash`` or ``interactive``: Lightning then treats the job as interactive and every task spawns its
own ranks, so each node trains a run of its own and all exit 0), and runs ``srun python -m skipvision fit`` with
``trainer.num_nodes=N checkpoint.resume=auto``. SLURM sends USR1 ``--requeue-signal-s`` seconds before the time
limit; the ranks then save an hpc checkpoint in the run folder and requeue the job, which resumes from it
(skipvision/lit/requeue.py). ``MASTER_ADDR`` is exported as the first node's address as SLURM knows it
(``NodeAddr``): Lightning would otherwise use the first node's *name*, which need not resolve (it does not on the
fake nodes of scripts/slurm-localhost). Nothing here imports torch.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

import skipvision
from skipvision.errors import SkipvisionError
from skipvision.recipe import find_recipe, load_recipe

INTERACTIVE_NAMES = ("bash", "interactive")  # job names Lightning's SLURMEnvironment reads as "not a SLURM job"
DAYS_FORMAT = re.compile(r"(\d+)-(\d+)(?::(\d+))?(?::(\d+))?")  # D-H, D-H:M, D-H:M:S
PLAIN_FORMAT = re.compile(r"(\d+)(?::(\d+))?(?::(\d+))?")  # M, M:S, H:M:S
WORD = re.compile(r"^[^\s'\"\\]+$")
SBATCH_TIMEOUT_S = 60


class SlurmError(SkipvisionError, ValueError):
    """Options or a recipe that cannot make a SLURM job: nodes < 1, a job name Lightning reads as interactive, a
    time limit SLURM does not parse, ``trainer.devices`` that is not a count of tasks per node."""


class SubmitError(SkipvisionError, RuntimeError):
    """The job could not be submitted: no ``sbatch`` on PATH, or sbatch refused the script."""


@dataclass(frozen=True)
class SlurmJob:
    """Everything the sbatch script says; built and checked by :func:`plan_job`."""

    recipe: Path  # absolute
    overrides: tuple[str, ...]  # the user's, without the two the script adds
    workdir: Path  # the job runs here (--chdir), so relative recipe paths mean what they mean at submission
    output_dir: Path  # absolute; the script and SLURM's logs go to <output_dir>/slurm/
    job_name: str
    nodes: int
    tasks_per_node: int
    gpus_per_node: int
    time: str
    partition: str | None
    requeue_signal_s: int
    python: str
    pythonpath: Path  # the folder holding the skipvision package that wrote the script

    @property
    def slurm_dir(self) -> Path:
        return self.output_dir / "slurm"

    @property
    def script_path(self) -> Path:
        return self.slurm_dir / "job.sbatch"


def time_limit_s(limit: str) -> int | None:
    """Seconds of a SLURM ``--time`` value (``M``, ``M:S``, ``H:M:S``, ``D-H``, ``D-H:M``, ``D-H:M:S``); None for
    ``UNLIMITED``/``INFINITE``."""
    if limit.upper() in ("UNLIMITED", "INFINITE"):
        return None
    with_days = DAYS_FORMAT.fullmatch(limit)
    if with_days:
        days, hours, minutes, seconds = (int(x or 0) for x in with_days.groups())
        return ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    plain = PLAIN_FORMAT.fullmatch(limit)
    if plain is None:
        raise SlurmError(
            f"--time {limit!r} is not a SLURM time limit; use MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS"
        )
    first, second, third = plain.groups()
    if third is not None:  # hours:minutes:seconds
        return (int(first) * 60 + int(second)) * 60 + int(third)
    return int(first) * 60 + int(second or 0)  # minutes[:seconds]


def tasks_per_node(devices: Any) -> int:
    """srun tasks per node for ``trainer.devices``: one rank per device, so a count (``2``, ``"2"``) or a list of
    device ids (``[0, 1]``, ``"0,1"``). ``auto`` and ``-1`` are refused: the number must be known at submission."""
    count = None
    if isinstance(devices, int) and not isinstance(devices, bool):
        count = devices
    elif isinstance(devices, str) and re.fullmatch(r"\s*\d+\s*", devices):
        count = int(devices)
    elif isinstance(devices, str) and re.fullmatch(r"\s*\d+\s*(,\s*\d+\s*)+,?\s*", devices):
        count = len([d for d in devices.split(",") if d.strip()])
    elif isinstance(devices, list) and devices and all(isinstance(d, int) for d in devices):
        count = len(devices)
    if count is None or count < 1:
        raise SlurmError(
            f"trainer.devices is {devices!r}; a SLURM job needs the number of devices (= tasks) per node: "
            "set trainer.devices=N"
        )
    return count


def plan_job(
    recipe: str | Path,
    overrides: list[str] | None = None,
    *,
    nodes: int | None = None,
    gpus_per_node: int = 0,
    time: str = "01:00:00",
    partition: str | None = None,
    job_name: str | None = None,
    requeue_signal_s: int = 120,
    python: str | None = None,
) -> SlurmJob:
    """Load the recipe with its overrides (so bad keys fail now, not on the cluster) and check the options.

    ``nodes`` defaults to the recipe's ``trainer.num_nodes``, ``job_name`` to its ``name``, ``python`` to the
    interpreter running this."""
    overrides = list(overrides or [])
    for item in overrides:
        if item.split("=", 1)[0].strip() == "checkpoint.resume":
            raise SlurmError(
                f"override {item!r}: a SLURM job sets checkpoint.resume=auto itself (a requeued job must resume "
                "from its own newest checkpoint); resume a finished run by submitting it again with the same "
                "output_dir"
            )
    path = find_recipe(recipe).resolve()
    cfg = load_recipe(path, overrides)
    trainer: dict[str, Any] = OmegaConf.to_container(cfg.trainer, resolve=True)  # type: ignore[assignment]
    nodes = trainer["num_nodes"] if nodes is None else nodes
    if nodes < 1:
        raise SlurmError(f"--nodes must be >= 1, got {nodes}")
    tasks = tasks_per_node(trainer["devices"])
    if gpus_per_node < 0:
        raise SlurmError(f"--gpus-per-node must be >= 0, got {gpus_per_node}")
    if 0 < gpus_per_node < tasks:
        raise SlurmError(
            f"--gpus-per-node {gpus_per_node} is fewer than trainer.devices={tasks}: each of the {tasks} tasks "
            "per node drives one GPU"
        )
    name = cfg.name if job_name is None else job_name
    if name in INTERACTIVE_NAMES:
        raise SlurmError(
            f"job name {name!r}: Lightning treats a SLURM job named 'bash' or 'interactive' as interactive and "
            "every task would start its own ranks; choose another --job-name"
        )
    if not WORD.match(name):
        raise SlurmError(f"job name {name!r} must be one word without quotes or backslashes; set --job-name")
    if partition is not None and not WORD.match(partition):
        raise SlurmError(f"--partition {partition!r} must be one word")
    limit = time_limit_s(time)
    if not 1 <= requeue_signal_s <= 65535:
        raise SlurmError(f"--requeue-signal-s must be within 1..65535 (SLURM's limit), got {requeue_signal_s}")
    if limit is not None and requeue_signal_s >= limit:
        raise SlurmError(
            f"--requeue-signal-s {requeue_signal_s} is not shorter than --time {time} ({limit} s): the requeue "
            "signal would come before training starts"
        )
    return SlurmJob(
        recipe=path,
        overrides=tuple(overrides),
        workdir=Path.cwd(),
        output_dir=Path(cfg.output_dir).resolve(),
        job_name=name,
        nodes=nodes,
        tasks_per_node=tasks,
        gpus_per_node=gpus_per_node,
        time=time,
        partition=partition,
        requeue_signal_s=requeue_signal_s,
        python=python or sys.executable,
        pythonpath=Path(skipvision.__file__).resolve().parent.parent,
    )


def render_sbatch(job: SlurmJob) -> str:
    """The sbatch script of ``job``."""
    q = shlex.quote
    directives = [
        f"--job-name={job.job_name}",
        f"--nodes={job.nodes}",
        f"--ntasks-per-node={job.tasks_per_node}",
        *([f"--gpus-per-node={job.gpus_per_node}"] if job.gpus_per_node > 0 else []),
        f"--time={job.time}",
        *([f"--partition={job.partition}"] if job.partition else []),
        f"--chdir={job.workdir}",
        f"--output={job.slurm_dir}/%j.out",
        f"--error={job.slurm_dir}/%j.err",
        "--open-mode=append",
        f"--signal=USR1@{job.requeue_signal_s}",
        "--requeue",
    ]
    fit = [
        job.python,
        "-m",
        "skipvision",
        "fit",
        "--recipe",
        str(job.recipe),
        *job.overrides,
        f"trainer.num_nodes={job.nodes}",
        "checkpoint.resume=auto",
    ]
    lines = [
        "#!/bin/bash",
        *(f"#SBATCH {d}" for d in directives),
        "#",
        "# Written by `skipvision slurm`: every task runs one rank of `skipvision fit`.",
        f"# SLURM sends USR1 to the tasks {job.requeue_signal_s} s before the time limit: the ranks save",
        "# hpc_ckpt_<n>.ckpt in the run folder, requeue the job and exit; the requeued job resumes from its newest",
        "# checkpoint (checkpoint.resume=auto). Every attempt appends to the same <job id>.out and .err.",
        "set -euo pipefail",
        f"export PYTHONPATH={q(str(job.pythonpath))}${{PYTHONPATH:+:$PYTHONPATH}}",
        "# Lightning takes MASTER_ADDR before the node list, whose first *name* need not resolve: use the first node's",
        "# address as SLURM knows it (NodeAddr). MASTER_PORT: from the job id, so the same on every node and restart.",
        'first_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p) || true',
        "MASTER_ADDR=$(scontrol show node -o \"$first_node\" | sed -n 's/.* NodeAddr=\\([^ ]*\\).*/\\1/p') || true",
        "export MASTER_ADDR=${MASTER_ADDR:-$first_node}",
        "export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))",
        'echo "skipvision slurm: job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0} on $SLURM_JOB_NODELIST,'
        ' master $MASTER_ADDR:$MASTER_PORT"',
        "srun --kill-on-bad-exit=1 " + " ".join(q(a) for a in fit),
    ]
    return "\n".join(lines) + "\n"


def write_script(job: SlurmJob) -> Path:
    """Write the script to ``<output_dir>/slurm/job.sbatch`` (replacing an earlier one) and return its path."""
    job.slurm_dir.mkdir(parents=True, exist_ok=True)
    job.script_path.write_text(render_sbatch(job))
    return job.script_path


def sbatch_path() -> str:
    """The ``sbatch`` on PATH; a :class:`SubmitError` when there is none."""
    found = shutil.which("sbatch")
    if found is None:
        raise SubmitError(
            "sbatch not found on PATH: submit from a SLURM login node (bash scripts/slurm-localhost starts a local "
            "test cluster), or pass --dry-run to only write the script"
        )
    return found


def submit(script: Path, sbatch: str | None = None) -> str:
    """Submit ``script`` with sbatch; returns the job id."""
    command = [sbatch or sbatch_path(), "--parsable", str(script)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=SBATCH_TIMEOUT_S)
    except subprocess.TimeoutExpired as err:
        raise SubmitError(f"sbatch did not answer within {SBATCH_TIMEOUT_S} s (is slurmctld running?)") from err
    if done.returncode != 0:
        reason = " ".join(done.stderr.split()) or f"exit status {done.returncode}"
        raise SubmitError(f"sbatch refused {script}: {reason}")
    return done.stdout.strip().split(";")[0]
