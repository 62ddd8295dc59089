"""Module attributes that import their defining module on first access (docs/cli.md "Startup").

``skipvision`` and ``skipvision.inference`` export names whose modules pull in torch; loading them lazily keeps
``import skipvision`` and the CLI's argument parsing fast.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(
    module: str, exports: Mapping[str, str], public: list[str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``module`` whose names ``exports`` (name -> defining module) load on first
    access; ``public`` is the module's ``__all__``."""

    def getattr_(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        return getattr(importlib.import_module(exports[name]), name)

    def dir_() -> list[str]:
        return sorted({*importlib.import_module(module).__dict__, *public})

    return getattr_, dir_
