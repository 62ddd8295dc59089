"""A run folder belongs to one run (docs/runs.md "Run folders").

``fit`` refuses a folder that holds another run's checkpoints unless it resumes it (``checkpoint.resume``) or is told
to overwrite it (``checkpoint.overwrite=true``), and holds an exclusive lock on the folder while it runs, so a second
concurrent fit into it is refused. The lock is an ``flock`` on ``<run>/.lock``: the operating system releases it when
the process dies, however it dies, and the file is removed on a normal exit. Only the process of global rank 0 claims
the folder; the other ranks of the same run (started by Lightning, srun or by hand on other nodes) write nothing there.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from skipvision.errors import OutputExistsError

RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "GROUP_RANK")


def is_first_process() -> bool:
    """Whether this process is global rank 0 of its run, from the launchers' environment (before any Trainer)."""
    return all(os.environ.get(name, "0") == "0" for name in RANK_VARIABLES)


def checkpoints_in(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "checkpoints").glob("*.ckpt"))


@contextmanager
def claim(run_dir: Path, resuming: bool, overwrite: bool) -> Iterator[None]:
    """Hold ``run_dir`` for this run (module docstring); a no-op on the other ranks."""
    if not is_first_process():
        yield
        return
    found = checkpoints_in(run_dir)
    if found and not resuming and not overwrite:
        raise OutputExistsError(
            f"{run_dir} holds another run's checkpoints ({len(found)}, e.g. {found[-1].name}); resume it with "
            "checkpoint.resume=last, replace it with checkpoint.overwrite=true, or choose another output_dir"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / ".lock"
    handle = open(lock, "w")  # held, and locked, for the whole run
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise OutputExistsError(f"another fit is running in {run_dir} (it holds {lock}); wait for it to end") from None
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()
