"""Strict loading: every tensor a component needs comes from the source and every tensor of the source is used, or
the load fails naming both lists (docs/checkpoints.md "Strict loading"). A folder that holds no weights for a
component is an error, never a random initialisation."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from skipvision.errors import SkipvisionError

SHOWN = 5  # keys named per list in an error message


class WeightsMismatchError(SkipvisionError, ValueError):
    """A weight source does not fit the component: tensors missing, unused, or of the wrong shape."""


def _some(keys: list[str]) -> str:
    more = f" and {len(keys) - SHOWN} more" if len(keys) > SHOWN else ""
    return ", ".join(keys[:SHOWN]) + more


def load_strict(
    module: nn.Module,
    tensors: Mapping[str, torch.Tensor],
    source: str,
    unused_ok: Callable[[str], bool] | None = None,
) -> None:
    """Load ``tensors`` into ``module``: every entry of its state dict must be there with its shape, and every
    tensor must be used, except those ``unused_ok`` accepts (parts the source's own model never runs either, such
    as vision layers past the feature layer). ``source`` names the file or folder in the message."""
    own = module.state_dict()
    if not tensors:
        raise WeightsMismatchError(f"{source} holds no weights for {type(module).__name__}")
    missing = sorted(set(own) - set(tensors))
    unused = sorted(k for k in set(tensors) - set(own) if unused_ok is None or not unused_ok(k))
    wrong = sorted(k for k in set(own) & set(tensors) if tuple(own[k].shape) != tuple(tensors[k].shape))
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing ({_some(missing)})")
    if unused:
        problems.append(f"{len(unused)} unused ({_some(unused)})")
    if wrong:
        shapes = [f"{k} {tuple(tensors[k].shape)} vs {tuple(own[k].shape)}" for k in wrong]
        problems.append(f"{len(wrong)} of the wrong shape ({_some(shapes)})")
    if problems:
        raise WeightsMismatchError(f"{source} does not fit {type(module).__name__}: {'; '.join(problems)}")
    module.load_state_dict({k: tensors[k] for k in own}, strict=True)
