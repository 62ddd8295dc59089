"""Run folders that never silently lose or change work (docs/runs.md "Run folders")."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from skipvision.cli import main
from skipvision.inference import VLMGenerator
from skipvision.lit.callbacks import StepProgressBar
from skipvision.lit.checkpoint_io import PARTIAL, AtomicCheckpointIO
from skipvision.lit.run import build, build_trainer, is_intact, resolve_resume
from skipvision.lit.runfolder import claim
from skipvision.recipe import load_recipe

from .conftest import TINY_RECIPE
from .processes import process_env, run_cli


def fit(*overrides: str) -> int:
    return main(["fit", "--recipe", str(TINY_RECIPE), *overrides])


def one_line(capsys: pytest.CaptureFixture[str]) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("skipvision ")]
    assert len(lines) == 1, lines
    return lines[0]


def test_another_runs_folder_is_refused_unless_resumed_or_overwritten(
    tiny_overrides: list[str], tmp_path: Path, capsys
) -> None:
    run = tmp_path / "run"
    assert fit(*tiny_overrides) == 0
    before = (run / "recipe.yaml").read_text()
    assert fit(*tiny_overrides, "model.skip.policy=uniform") == 2
    assert f"{run} holds another run's checkpoints" in one_line(capsys)
    assert (run / "recipe.yaml").read_text() == before  # nothing changed
    assert fit(*tiny_overrides, "checkpoint.resume=last", "trainer.max_steps=3") == 0
    assert fit(*tiny_overrides, "checkpoint.overwrite=true", "trainer.max_steps=1") == 0
    assert sorted(p.name for p in (run / "checkpoints").glob("*.ckpt")) == ["last.ckpt", "step=1.ckpt"]
    assert not (run / ".lock").exists()  # released and removed after each fit


def test_a_concurrent_fit_into_the_same_folder_is_refused(tiny_overrides: list[str], tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    with claim(run, resuming=False, overwrite=False):  # another fit holds the folder
        assert fit(*tiny_overrides) == 2
        assert f"another fit is running in {run}" in one_line(capsys)
    assert fit(*tiny_overrides) == 0  # released


def test_nothing_is_written_before_the_specs_validate(tiny_overrides: list[str], tmp_path: Path, capsys) -> None:
    assert fit(*tiny_overrides, "model.projector=mlp3x_gelu") == 2
    assert "mlp3x_gelu" in one_line(capsys)
    run = tmp_path / "run"
    assert not (run / "recipe.yaml").exists() and not (run / "tokenizer").exists()


def test_a_checkpoint_uses_its_own_recipe(tiny_overrides: list[str], tmp_path: Path) -> None:
    """A folder recipe that no longer matches a checkpoint is reported, never applied."""
    assert fit(*tiny_overrides) == 0
    run = tmp_path / "run"
    folder_recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    folder_recipe["model"]["skip"] = {"policy": {"name": "uniform", "num_retained": 4}, "num_skipped": 4}
    for copy in (run / "recipe.yaml", run / "checkpoints" / "recipe.yaml"):  # as a later fit would rewrite them
        copy.write_text(yaml.safe_dump(folder_recipe))
    with pytest.warns(UserWarning, match="differs from the recipe stored in .*step=2.ckpt; using the checkpoint's own"):
        generator = VLMGenerator.from_checkpoint(run / "checkpoints" / "step=2.ckpt")
    assert generator.model.num_image_tokens == 16 and not generator.model.visual.layout.skips  # the checkpoint: no skip


def test_a_file_that_is_not_a_checkpoint_says_so(tiny_overrides: list[str], tmp_path: Path, capsys) -> None:
    assert fit(*tiny_overrides) == 0
    fake = tmp_path / "run" / "checkpoints" / "notes.ckpt"
    fake.write_text("not a checkpoint\n")
    assert main(["generate", "--checkpoint", str(fake), "--prompt", "hi"]) == 2
    line = one_line(capsys)
    assert f"{fake} is not a readable checkpoint" in line and "weights_only=False" not in line


@pytest.mark.parametrize("workers", [0, 1])
def test_a_stream_with_nothing_valid_stops_with_one_line(tiny_overrides: list[str], workers: int, capsys) -> None:
    """docs/runs.md "Bad data": every sample over max_length would be skipped forever; the run stops instead, with
    the cause, in one line also from a DataLoader worker."""
    bad = ["data.max_length=10", "data.max_errors_in_a_row=20", f"data.num_workers={workers}"]
    assert fit(*tiny_overrides, *bad) == 2
    line = one_line(capsys)
    assert "no valid sample in the last 20 read (data.max_errors_in_a_row)" in line
    assert "over data.max_length=10" in line and "Traceback" not in line


def test_resume_from_a_cut_last_checkpoint_names_the_newest_intact_one(
    tiny_overrides: list[str], tmp_path: Path, capsys
) -> None:
    assert fit(*tiny_overrides, "checkpoint.every_n_steps=1") == 0
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # a write cut short
    assert fit(*tiny_overrides, "checkpoint.resume=last", "trainer.max_steps=3") == 2
    intact = tmp_path / "run" / "checkpoints" / "step=2.ckpt"
    assert one_line(capsys) == (
        f"skipvision fit: error: {last} is incomplete or corrupt (a write cut short?); the newest intact checkpoint "
        f"is {intact} (checkpoint.resume={intact})"
    )
    assert fit(*tiny_overrides, f"checkpoint.resume={intact}", "trainer.max_steps=3") == 0


def test_checkpoint_writes_are_atomic_in_their_folder(tiny_overrides: list[str], tmp_path: Path) -> None:
    """docs/runs.md "Run folders": a write that fails leaves the old checkpoint whole and no partial file; partial
    files a killed writer left are removed when the next fit starts."""
    assert fit(*tiny_overrides) == 0
    folder = tmp_path / "run" / "checkpoints"
    last = folder / "last.ckpt"
    before = last.read_bytes()
    with pytest.raises(Exception):  # noqa: B017 - whatever torch.save raises for an unpicklable object
        AtomicCheckpointIO().save_checkpoint({"bad": lambda: None}, last)
    assert last.read_bytes() == before and not list(folder.glob(".*partial*"))
    stale = folder / f".last.ckpt{PARTIAL}12345"
    stale.write_bytes(b"half a checkpoint")
    assert fit(*tiny_overrides, "checkpoint.resume=last", "trainer.max_steps=3") == 0
    assert not stale.exists()


def test_sigkill_mid_run_then_resume_loses_only_the_unsaved_steps(tiny_overrides: list[str], tmp_path: Path) -> None:
    """A fit killed with SIGKILL (every step checkpointed) resumes from its last complete checkpoint, with no
    partial file left behind, and a second fit started while the first runs is refused."""
    run = tmp_path / "run"
    args = ["fit", "--recipe", str(TINY_RECIPE), *tiny_overrides, "trainer.max_steps=400", "checkpoint.every_n_steps=1"]
    log = (tmp_path / "fit.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "skipvision", *args], env=process_env(), stdout=log, stderr=log, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 120
        while not (run / "checkpoints" / "step=4.ckpt").exists():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "fit.log").read_text()[-2000:]
            time.sleep(0.05)
        assert fit(*tiny_overrides, "checkpoint.resume=last") == 2  # the running fit holds the folder
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    saved = max(int(p.stem.split("=")[1]) for p in (run / "checkpoints").glob("step=*.ckpt") if is_intact(p))
    assert fit(*tiny_overrides, "checkpoint.resume=last", f"trainer.max_steps={saved + 2}") == 0
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == saved + 2
    assert not list((run / "checkpoints").glob(".*partial*")) and not (run / ".lock").exists()


def test_bad_recipe_values_and_yaml_are_one_line(tmp_path: Path, capsys) -> None:
    """docs/runs.md "Bad data": out-of-range values are refused before anything runs; a YAML syntax error names the
    file, line and column."""
    assert main(["print-recipe", "--recipe", str(TINY_RECIPE), "data.batch_size=0"]) == 2
    assert one_line(capsys).endswith("Recipe key 'data.batch_size' is 0; it must be at least 1")
    assert main(["print-recipe", "--recipe", str(TINY_RECIPE), "optim.min_lr_ratio=1.5"]) == 2
    assert one_line(capsys).endswith("Recipe key 'optim.min_lr_ratio' is 1.5; it must be between 0 and 1")
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: x\ndata: {batch_size: 4\n")
    assert main(["print-recipe", "--recipe", str(broken)]) == 2
    assert one_line(capsys).endswith(
        f"Recipe {broken} is not valid YAML at line 3, column 1: did not find expected ',' or '}}'"
    )
    with pytest.raises(SystemExit):
        main(["generate", "--checkpoint", "x", "--requests", "y", "--batch-size", "0"])
    assert "argument --batch-size: must be at least 1, got 0" in capsys.readouterr().err


def test_logs_without_a_terminal_are_plain_lines_and_a_summary(
    tiny_overrides: list[str], tmp_path: Path, capsys
) -> None:
    """docs/runs.md "Logs": captured stdout is not a terminal, as in a file or a SLURM job."""
    assert (
        fit(*tiny_overrides, "trainer.max_steps=4", "trainer.log_every_n_steps=2", "trainer.limit_val_batches=null")
        == 0
    )
    out = capsys.readouterr().out.splitlines()
    steps = [line for line in out if line.startswith("step ")]
    assert [line.split(" | ")[0] for line in steps] == ["step 2/4", "step 4/4"]
    assert all(" | loss " in line and " | eta " in line for line in steps)
    [validation] = [line for line in out if line.startswith("validation at step 4: ")]
    assert "acc_all" in validation and "acc_colour" in validation and "loss" in validation
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert (
        out[-1] == f"run folder: {tmp_path / 'run'}; generate with: python -m skipvision generate --checkpoint {last}"
    )
    assert out[-2].startswith("done: 4 steps; acc_all ")


def test_a_fit_log_has_no_third_party_noise(tiny_overrides: list[str], tmp_path: Path) -> None:
    """docs/runs.md "Logs": a fit writing to a file, as a job would; the known noise is gone at its source."""
    out = run_cli(["fit", "--recipe", str(TINY_RECIPE), *tiny_overrides], tmp_path / "fit.log", 120)
    for noise in ("srun", "Tip:", "LeafSpec", "Total FLOPs", "Modules in train mode", "┃"):
        assert noise not in out, noise
    assert "parameters: 59.4 K (59.4 K trainable): encoder 19.5 K, projector 2.1 K, llm 37.8 K" in out


def test_the_terminal_bar_counts_steps_of_the_run_also_after_a_resume(
    tiny_overrides: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/runs.md "Logs": in a terminal the bar reads ``step 4/4`` after a resume from step 2, not ``2/0``."""
    assert fit(*tiny_overrides) == 0
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    cfg = load_recipe(TINY_RECIPE, [*tiny_overrides, "checkpoint.resume=last", "trainer.max_steps=4"])
    cfg.trainer.enable_progress_bar = True
    module, datamodule, run_dir = build(cfg)
    trainer = build_trainer(cfg, run_dir)
    [bar] = [c for c in trainer.callbacks if isinstance(c, StepProgressBar)]
    trainer.fit(module, datamodule=datamodule, ckpt_path=resolve_resume(cfg, run_dir))
    assert (bar.train_progress_bar.n, bar.train_progress_bar.total) == (4, 4)
    assert "v_num" not in bar.get_metrics(trainer, module)
