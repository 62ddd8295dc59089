"""The wheel installs whole (docs/cli.md "Recipes and presets"): built from this tree, installed into a throwaway
venv that reuses the installed dependencies, and run from another folder without the repository on the path."""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

import skipvision
from skipvision.recipe import load_recipe, to_yaml

REPO = Path(__file__).resolve().parent.parent
BUILD_INPUTS = ("pyproject.toml", "README.md", "skipvision", "recipes", "registry")
OUTSIDE_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PIP_DISABLE_PIP_VERSION_CHECK": "1"}


def _run(argv: list[str | Path], *, timeout: float, cwd: Path, env: dict[str, str] | None = None) -> str:
    """stdout of a command that must succeed within ``timeout`` seconds."""
    done = subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env or OUTSIDE_ENV
    )
    assert done.returncode == 0, f"{argv} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel of a copy of the tree (the build writes build/ and *.egg-info next to its sources)."""
    src, dist = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("dist")
    for name in BUILD_INPUTS:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(REPO / name, src / name)
    pip = [sys.executable, "-m", "pip", "wheel", src, "--no-deps", "--no-build-isolation", "--no-index", "-w", dist]
    _run(pip, timeout=180, cwd=src)
    [built] = dist.glob("skipvision-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bin/ folder of a fresh venv with the wheel installed; a .pth adds this interpreter's site-packages,
    so the dependencies are reused rather than installed again."""
    venv = tmp_path_factory.mktemp("venv")
    _run([sys.executable, "-m", "venv", "--without-pip", venv], timeout=120, cwd=venv)
    python = venv / "bin" / "python"
    where = _run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], timeout=60, cwd=venv)
    deps = sorted({sysconfig.get_path("purelib"), sysconfig.get_path("platlib")})
    Path(where.strip(), "_skipvision_deps.pth").write_text(
        "import site; " + "; ".join(f"site.addsitedir({d!r})" for d in deps) + "\n"
    )
    _run([python, "-m", "pip", "install", "--no-deps", "--no-index", wheel], timeout=180, cwd=venv)
    return venv / "bin"


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    return folder


def test_the_wheel_holds_every_module_recipe_and_preset(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as whl:
        names = set(whl.namelist())
        metadata = whl.read(f"skipvision-{skipvision.__version__}.dist-info/METADATA").decode()
    modules = {f"skipvision/{p.relative_to(REPO / 'skipvision')}" for p in (REPO / "skipvision").rglob("*.py")}
    recipes = {f"skipvision/recipes/{p.name}" for p in (REPO / "recipes").glob("*.yaml")}
    presets = {f"skipvision/presets/{p.relative_to(REPO / 'registry')}" for p in (REPO / "registry").glob("*/*.yaml")}
    assert {n for n in names if not n.startswith("skipvision-")} == modules | recipes | presets
    assert f"\nVersion: {skipvision.__version__}\n" in metadata


def test_the_wheel_declares_the_lmms_eval_model_and_its_pinned_extra(wheel: Path) -> None:
    """``pip install skipvision[lmms-eval]`` installs the lmms-eval version CI tests, and lmms-eval finds the model
    through this entry point (docs/evaluation.md "lmms-eval"); tests/test_lmms_eval.py runs it with the same entry
    point, from the checkout's metadata."""
    with zipfile.ZipFile(wheel) as whl:
        info = f"skipvision-{skipvision.__version__}.dist-info"
        metadata = whl.read(f"{info}/METADATA").decode()
        points = configparser.ConfigParser()
        points.read_string(whl.read(f"{info}/entry_points.txt").decode())
    assert dict(points["lmms_eval.models"]) == {"skipvision": "skipvision.integrations:lmms_eval_manifest"}
    lock = (REPO / "requirements-lmms-eval.lock").read_text().splitlines()
    [pinned] = [line.replace("_", "-") for line in lock if line.replace("_", "-").startswith("lmms-eval==")]
    assert f'\nRequires-Dist: {pinned}; extra == "lmms-eval"\n' in metadata


def test_installed_list_and_print_recipe_match_the_checkout(installed: Path, outside: Path) -> None:
    where = _run([installed / "python", "-c", "import skipvision; print(skipvision.__file__)"], timeout=60, cwd=outside)
    assert Path(where.strip()).is_relative_to(installed.parent)  # the installed copy, not the checkout

    listed = _run([installed / "skipvision", "list"], timeout=60, cwd=outside)
    checkout_env = OUTSIDE_ENV | {"PYTHONPATH": str(REPO)}
    assert listed == _run([sys.executable, "-m", "skipvision", "list"], timeout=60, cwd=REPO, env=checkout_env)
    for kind in ("encoder", "backbone"):
        shipped = ", ".join(sorted(p.stem for p in (REPO / "registry" / kind).glob("*.yaml")))
        assert f"{kind}\n" in listed and f"\n  presets: {shipped}\n" in listed.split(f"{kind}\n", 1)[1]

    printed = _run([installed / "skipvision", "print-recipe", "--recipe", "shapes-tiny"], timeout=60, cwd=outside)
    assert printed == to_yaml(load_recipe("shapes-tiny"))
    derived = _run([installed / "skipvision", "print-recipe", "--recipe", "bench-llava"], timeout=60, cwd=outside)
    assert derived == to_yaml(load_recipe("bench-llava"))  # its defaults: [shapes-tiny.yaml] resolve in the package


def test_installed_fit_two_steps_of_a_shipped_recipe(installed: Path, outside: Path, tiny_shapes: Path) -> None:
    """shapes-tiny with its presets, on the tests' tiny shards for two steps of batch 4."""
    run = outside / "run"
    overrides = [
        f"data.train_shards={tiny_shapes}/train/*.tar",
        f"data.val_shards={tiny_shapes}/val/*.tar",
        f"data.tokenizer={tiny_shapes}/tokenizer",
        "data.batch_size=4",
        "data.val_batch_size=8",
        "data.num_workers=0",
        "data.shuffle_buffer=16",
        "trainer.max_steps=2",
        "trainer.val_check_interval=null",
        "trainer.limit_val_batches=1",
        "trainer.enable_progress_bar=false",
        "checkpoint.every_n_steps=null",
        f"output_dir={run}",
    ]
    _run([installed / "skipvision", "fit", "--recipe", "shapes-tiny", *overrides], timeout=300, cwd=outside)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt", "recipe.yaml", "step=2.ckpt"]
    saved = yaml.safe_load((run / "recipe.yaml").read_text())
    assert saved["name"] == "shapes-tiny" and saved["model"]["encoder"] == "resnet-shapes-tiny"
    assert torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 2
