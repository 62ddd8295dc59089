"""SLURM's requeue signal, handled between steps on all ranks together: save, flush the logs, requeue, stop.

A job written by ``skipvision slurm`` gets USR1 on every task ``--requeue-signal-s`` seconds before its time limit
(``sbatch --signal=USR1@<s>``; ``scancel --signal=USR1 <job>`` sends the same by hand). Lightning's own handler
(``SLURMEnvironment(auto_requeue=True)``) does its work inside the signal handler, which can run between any two
bytecodes: one rank may enter the checkpoint's barrier while another waits in the gradient all-reduce, collectives
that do not match and hang until SLURM kills the job (Lightning issue 21406 reports such hangs); and training goes
on after the save until SLURM's SIGTERM arrives, so the steps in between run again after the restart and appear
twice in the logs. Here the handler only sets a flag. At the end of each optimizer step the ranks agree on it (one
all-reduce of a bool; Lightning already broadcasts its SIGTERM flag every step), and when any rank got the signal
all of them save ``hpc_ckpt_<n>.ckpt`` in the run folder, where Lightning saves its step checkpoints (written
under a temporary name and renamed, so a kill mid-save never leaves a truncated checkpoint to resume from). Before
the next step or validation, once Lightning has logged the saved step, they flush the loggers, rank 0 runs
``scontrol requeue``, and every rank leaves ``fit`` with exit status 0. The requeued job resumes from the newest
checkpoint (``checkpoint.resume=auto``, skipvision/lit/run.py): no step is lost from the logs and none runs twice.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

HPC_CHECKPOINT = re.compile(r"hpc_ckpt_(\d+)\.ckpt")  # Lightning's name for these, so its own resume finds them
SCONTROL_TIMEOUT_S = 60


class RequeueExit(SystemExit):
    """Training stopped after saving, for the requeued job to go on; the process exits with status 0."""

    def __init__(self) -> None:
        super().__init__(0)


def slurm_requeue() -> tuple[list[SLURMEnvironment], list[L.Callback]]:
    """The Trainer plugins and callbacks for running as a SLURM job step (none elsewhere): Lightning's SLURM
    environment without its in-handler requeue, and :class:`SlurmRequeue` in its place."""
    if not SLURMEnvironment.detect():
        return [], []
    return [SLURMEnvironment(auto_requeue=False)], [SlurmRequeue()]


def next_hpc_checkpoint(run_dir: Path) -> Path:
    """``hpc_ckpt_<n>.ckpt`` with n one above the run folder's highest (Lightning's numbering)."""
    numbers = [int(m.group(1)) for p in run_dir.glob("hpc_ckpt_*.ckpt") if (m := HPC_CHECKPOINT.fullmatch(p.name))]
    return run_dir / f"hpc_ckpt_{max(numbers, default=0) + 1}.ckpt"


def request_requeue() -> bool:
    """``scontrol requeue`` this job (or array task); True when SLURM accepted it."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ.get("SLURM_JOB_ID")
    if not job:
        rank_zero_warn("Requeue signal outside a SLURM job (no SLURM_JOB_ID): not requeued")
        return False
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=SCONTROL_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as err:
        rank_zero_warn(f"scontrol requeue {job} failed: {err}")
        return False
    if done.returncode != 0:
        rank_zero_warn(f"scontrol requeue {job} failed ({done.returncode}): {' '.join(done.stderr.split())}")
        return False
    return True


class SlurmRequeue(L.Callback):
    """On ``signum`` (USR1): all ranks save an hpc checkpoint at the end of the next optimizer step, and before
    anything else runs (the next step, or a validation) rank 0 requeues the job and training stops (module
    docstring). If SLURM refuses the requeue (a job submitted without ``--requeue``, or not a batch job), training
    goes on; the checkpoint stays for a manual resubmission."""

    def __init__(self, signum: signal.Signals = signal.SIGUSR1) -> None:
        self.signum = signum
        self.requested = False  # set by the signal handler, on this rank only
        self.saved: Path | None = None  # the hpc checkpoint saved for a requeue not yet asked for
        self._previous: Any = None
        self._installed = False

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True  # nothing else here: the work happens between steps, on all ranks together

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(self.signum, self._on_signal)
            self._installed = True

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._installed:
            signal.signal(self.signum, self._previous)
            self._installed = False

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Where Lightning's own step checkpoints are saved, so a resume from here continues at the next step.
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return  # mid-accumulation: wait for the optimizer step
        if trainer.strategy.reduce_boolean_decision(self.requested, all=False):
            self.requested = False
            self.save(trainer)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # Lightning logs a step's metrics after on_train_batch_end: stopping here, they are in the logs.
        if self.saved is not None:
            self.requeue_and_stop(trainer)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A validation due after the saved step: the resumed run does it, after resuming from that step.
        if self.saved is not None:
            self.requeue_and_stop(trainer)

    def save(self, trainer: L.Trainer) -> None:
        """Save ``hpc_ckpt_<n>.ckpt`` in the run folder: every rank takes part, rank 0 writes it under a temporary
        name and renames it."""
        run_dir = Path(trainer.default_root_dir)
        final = next_hpc_checkpoint(run_dir)
        partial = run_dir / f".requeue-{final.stem}.partial"  # not matched by hpc_ckpt_*: never resumed from
        trainer.save_checkpoint(partial)  # rank 0 writes, then all ranks meet at a barrier
        if trainer.is_global_zero:
            os.replace(partial, final)
            rank_zero_info(f"Requeue signal: saved {final} at step {trainer.global_step}")
        self.saved = final

    def requeue_and_stop(self, trainer: L.Trainer) -> None:
        """Flush the logs and ask SLURM to requeue the job; stop (:class:`RequeueExit`) if it agreed."""
        self.saved = None
        for logger in trainer.loggers:
            logger.save()  # every step up to the checkpoint is on disk before the process ends
        # SLURM answers the requeue with SIGTERM to every task. Ignored from here on, it can neither kill a rank
        # while the others still tear down together, nor run Lightning's SIGTERM handler (a collective inside a
        # signal handler); the barrier makes every rank ignore it before rank 0 asks for the requeue.
        previous_sigterm = signal.signal(signal.SIGTERM, signal.SIG_IGN)
        trainer.strategy.barrier("skipvision-requeue")
        requeued = request_requeue() if trainer.is_global_zero else False
        if trainer.strategy.broadcast(requeued, src=0):
            rank_zero_info(f"Requeued the SLURM job; stopping after step {trainer.global_step}")
            raise RequeueExit
        signal.signal(signal.SIGTERM, previous_sigterm)  # not requeued: train on, as before the signal
