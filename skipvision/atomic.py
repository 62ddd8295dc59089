"""Writing a file so that readers see either the old file or the whole new one, never a part of it."""

from __future__ import annotations

import os
from pathlib import Path

PARTIAL = ".part"  # the suffix of a file being written; renamed into place when complete


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` under a temporary name in the same folder, then rename it into place
    (``os.replace`` is atomic within one filesystem), so an interrupted write never leaves half a file."""
    partial = path.with_name(path.name + PARTIAL)
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)
