"""Building a model's structure without its weights, for FSDP (docs/distributed.md "FSDP").

Under :func:`skeleton` every parameter is created on the meta device (shapes, no storage), and the builders that
would read weights from disk (a backbone or vision tower ``path``, timm's ``pretrained``/``checkpoint_path``) build
the same architecture from the checkpoint's configuration instead: transformers refuses ``from_pretrained`` under a
meta device. The weights come later, from the one rank that builds the whole model (skipvision/lit/fsdp.py).
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager

import torch

_ACTIVE = contextvars.ContextVar("skipvision_skeleton", default=False)


@contextmanager
def skeleton() -> Iterator[None]:
    """Build on the meta device, reading configurations but no weights."""
    token = _ACTIVE.set(True)
    try:
        with torch.device("meta"):
            yield
    finally:
        _ACTIVE.reset(token)


def building_skeleton() -> bool:
    """Whether builders should skip reading weights (inside :func:`skeleton`)."""
    return _ACTIVE.get()
