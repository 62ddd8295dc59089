"""Checkpoint files written atomically in their own folder (docs/runs.md "Run folders").

Lightning's own writer stages a checkpoint in the system's temporary folder and moves it into place, which is a
copy, not an atomic rename, when the two are on different filesystems (a kill mid-copy leaves a truncated
``last.ckpt``). Here the file is written next to its destination under a hidden partial name and renamed over it
(``os.replace``, atomic within one filesystem); a failed write removes its partial file, and :func:`remove_partials`
clears those a killed process left behind.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

PARTIAL = ".partial-"


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose writes are temp file + rename in the destination folder."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}{PARTIAL}{os.getpid()}")
        try:
            torch.save(checkpoint, partial)
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)


def remove_partials(folder: Path) -> list[Path]:
    """Delete the partial checkpoint files a killed writer left in ``folder``; returns them."""
    found = sorted(folder.glob(f".*{PARTIAL}*")) if folder.is_dir() else []
    for path in found:
        path.unlink(missing_ok=True)
    return found
