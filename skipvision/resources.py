"""The recipes and component presets that ship with skipvision (docs/cli.md "Recipes and presets").

They live at the top of the repository, ``recipes/*.yaml`` and ``registry/<kind>/*.yaml``. The wheel carries the
same folders as the package data ``skipvision.recipes`` and ``skipvision.presets`` (pyproject.toml maps them), read
here with importlib.resources, so ``--recipe shapes-tiny`` and presets resolve from an installed package anywhere.
A checkout run from ``PYTHONPATH`` (scripts/venv-run) is not installed and has no such packages: there the
repository's folders are read directly.

Shipped recipes may name their ``defaults:`` by paths relative to themselves; both layouts keep the recipes side by
side, and pip unpacks wheels, so every shipped file is a real file with a real path.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

_CHECKOUT = Path(__file__).resolve().parent.parent


def _shipped(package: str, folder: str) -> Traversable:
    """The installed package ``package``, else the checkout's ``folder``."""
    try:
        return files(package)
    except ModuleNotFoundError:
        return _CHECKOUT / folder


def _yaml_files(folder: Traversable) -> dict[str, Path]:
    if not folder.is_dir():
        return {}
    return {p.name.removesuffix(".yaml"): Path(str(p)) for p in folder.iterdir() if p.name.endswith(".yaml")}


def shipped_recipes() -> dict[str, Path]:
    """Every shipped recipe file by name (``shapes-tiny`` -> ``.../shapes-tiny.yaml``)."""
    return _yaml_files(_shipped("skipvision.recipes", "recipes"))


def shipped_presets(kind: str) -> dict[str, Path]:
    """Every shipped preset file of a component kind (``encoder``, ``backbone``, ...) by name."""
    return _yaml_files(_shipped("skipvision.presets", "registry").joinpath(kind))
