"""A method's run through the CLI, as the method tests do it: ``fit`` on the tests' tiny recipe, then ``generate``
on one image, each in a child process under a deadline."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .conftest import TINY_RECIPE
from .processes import run_cli

PROMPT = "What colour is the circle?"


@dataclass
class CliRun:
    run: Path  # the run folder
    image: Path  # the image ``generate`` answered about
    fit_log: str
    losses: list[float]  # train/loss of every logged step
    generated: list[str]  # ``generate``'s output lines


def fit_and_generate(overrides: list[str], tmp_path: Path, timeout_s: float, *generate: str, **env: str) -> CliRun:
    """``fit --recipe tests/recipes/tiny.yaml OVERRIDES`` (which set ``output_dir=tmp_path/run``), then ``generate``
    from that run with :data:`PROMPT` on a green 32 x 32 image, 3 new tokens and the extra ``generate`` arguments;
    ``env``: the child processes' extra environment."""
    log = run_cli(["fit", "--recipe", str(TINY_RECIPE), *overrides], tmp_path / "fit.log", timeout_s, **env)
    run = tmp_path / "run"
    with open(run / "logs" / "version_0" / "metrics.csv") as metrics:
        losses = [float(row["train/loss"]) for row in csv.DictReader(metrics) if row["train/loss"]]
    image = tmp_path / "shape.png"
    Image.new("RGB", (32, 32), (30, 200, 30)).save(image)
    args = ["generate", "--checkpoint", str(run), "--image", str(image), "--prompt", PROMPT, "--max-new-tokens", "3"]
    out = run_cli([*args, *generate], tmp_path / "generate.log", timeout_s, **env)
    return CliRun(run, image, log, losses, out.splitlines())
