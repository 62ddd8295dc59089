"""Third-party messages that tell a user nothing about their run, silenced at their source (docs/runs.md "Logs").

Lightning's advertisement for its cloud logger, its warning that ``srun`` exists outside a SLURM job, and a
deprecation inside Lightning's own pytree helper appear on every run; they are filtered by their exact text, so any
other message still shows.
"""

from __future__ import annotations

import logging
import warnings

NOISY_WARNINGS = (
    r"The `srun` command is available on your system but is not used",
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
)
LIGHTNING_INFO = "lightning.pytorch.utilities.rank_zero"  # the logger of Lightning's rank_zero_info


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


def silence_noise() -> None:
    """Install the filters (idempotent)."""
    for pattern in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    lightning = logging.getLogger(LIGHTNING_INFO)
    if not any(isinstance(f, _DropTips) for f in lightning.filters):
        lightning.addFilter(_DropTips())
