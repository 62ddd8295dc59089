"""What a sample is, shared by the loader, the converter and the eval sets without their imports: the image
placeholder, which members are images, and the turn order of a LLaVA conversation.

Importing this module imports nothing heavy: ``data llava`` and ``eval`` build their parsers from modules that use
it (docs/cli.md "Startup"), while skipvision/data/chat.py and skipvision/data/pipeline.py, which also use it,
import transformers and torch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

IMAGE_PLACEHOLDER = "<image>"
# The image members the loader decodes (their extension, any case); a sample's images are in member-name order.
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")


def is_image_key(key: str) -> bool:
    """Whether a WebDataset field (``png``, ``img000.jpg``) is an image member the loader decodes."""
    return key.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS


def image_keys(sample: Mapping[str, Any] | Iterable[str]) -> list[str]:
    """A raw sample's image fields in the order the loader takes them (sorted by name)."""
    return sorted(key for key in sample if is_image_key(key))


def image_member(index: int, count: int, extension: str) -> str:
    """The field of the ``index``-th of ``count`` images of a sample: ``img000.png``, ... with at least three digits
    and as many as ``count - 1`` has, so that sorted names keep the images' order however many there are."""
    width = max(3, len(str(count - 1)))
    return f"img{index:0{width}d}.{extension}"


def turn_order_problem(turns: Sequence[Mapping[str, Any]], first: int = 0) -> str | None:
    """What is wrong with the order of LLaVA ``{from: human|gpt}`` turns (they alternate, human first and gpt last),
    or None; ``first`` is the number of the first turn in messages (1 after a system turn)."""
    if not turns:
        return "no turns"
    for i, turn in enumerate(turns):
        want = "human" if i % 2 == 0 else "gpt"
        if turn.get("from") != want:
            return f"turn {i + first} is {turn.get('from')!r}, expected {want!r}"
    if len(turns) % 2:
        return f"the last turn ({len(turns) - 1 + first}) is 'human', expected 'gpt'"
    return None
