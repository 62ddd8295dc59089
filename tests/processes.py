"""Starting test processes that can never hang the suite: every wait has a deadline, and on a timeout or failure
every process (and anything it started, such as Lightning's extra ranks) is killed and its output shown."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(**extra: str) -> dict[str, str]:
    """The test environment for child processes: offline, one thread each, the repository importable."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {
        **os.environ,
        "PYTHONPATH": path,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo"),
        **extra,
    }


def run_all(
    commands: Sequence[Sequence[str]],
    logs: Sequence[Path],
    timeout_s: float,
    env: dict[str, str] | Sequence[dict[str, str]],
) -> None:
    """Run ``commands`` side by side (each in its own process group, output to its log, with ``env`` or its own
    entry of ``env``); fail the test, killing every group, when one exits non-zero or all have not finished within
    ``timeout_s``."""
    envs = [env] * len(commands) if isinstance(env, dict) else list(env)
    procs = []
    for command, log, env in zip(commands, logs, envs, strict=True):
        with open(log, "wb") as out:
            procs.append(
                subprocess.Popen(
                    command, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
                )
            )
    deadline = time.monotonic() + timeout_s
    failure = None
    try:
        while failure is None and any(p.poll() is None for p in procs):
            if time.monotonic() > deadline:
                failure = f"processes did not finish within {timeout_s:.0f} s (hang?)"
            elif any(p.poll() not in (None, 0) for p in procs):
                failure = "a process failed"
            else:
                time.sleep(0.2)
        if failure is None and any(p.returncode != 0 for p in procs):
            failure = "a process failed"
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)  # the whole group: ranks a launcher started too
            except ProcessLookupError:
                pass
            p.wait()
    if failure is not None:
        tails = "\n".join(
            f"--- {log.name} (exit {p.returncode}) ---\n{log.read_text()[-4000:]}"
            for log, p in zip(logs, procs, strict=True)
        )
        pytest.fail(f"{failure}\n{tails}")


def run_cli(args: Sequence[str], log: Path, timeout_s: float, **env: str) -> str:
    """``python -m skipvision ARGS`` in a child process under a deadline; returns its output."""
    run_all([[sys.executable, "-m", "skipvision", *args]], [log], timeout_s, process_env(**env))
    return log.read_text()
