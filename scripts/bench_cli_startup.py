"""Wall time of the CLI's cheapest commands, each in a fresh interpreter (docs/benchmarks.md "CLI startup").

    bash scripts/venv-run python scripts/bench_cli_startup.py [--runs 5]

``--help`` builds every subcommand's parser and ``list`` reads the registries' catalogues and presets; neither
should import torch (docs/cli.md), which keeps both under a second. Prints the median and the range over
``--runs`` runs of each command. Not a test: timings depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

COMMANDS = (["--help"], ["list"])


def wall_times(argv: list[str], runs: int) -> list[float]:
    """Seconds per run of ``python -m skipvision ARGV``, one warm-up run first (file-system caches)."""
    command = [sys.executable, "-m", "skipvision", *argv]
    subprocess.run(command, check=True, capture_output=True, timeout=60)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True, timeout=60)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    for argv in COMMANDS:
        times = wall_times(argv, args.runs)
        print(
            f"python -m skipvision {' '.join(argv):<7} median {statistics.median(times):.3f} s "
            f"(min {min(times):.3f}, max {max(times):.3f}, {args.runs} runs)"
        )


if __name__ == "__main__":
    main()
