"""PyramidDrop peer: staged dropping of the least-attended image tokens inside the LLM (docs/method.md "Peers").

PyramidDrop (Xing et al., CVPR 2025) splits the LLM into stages; at each stage boundary the ``ratio`` share of the
image tokens still present that the last instruction token attends to least leaves the sequence, so the image
shrinks like a pyramid with depth. Unlike FastV it drops in training too (the model learns with the drops it meets
at inference). At the token stage it is the full model (every token retained, no merge, every slot runs the FFN);
the drops run on the multi-stage dropper (skipvision/skip/dropping.py).
"""

from __future__ import annotations

from collections.abc import Sequence

from skipvision.registry import SKIP_POLICIES
from skipvision.skip.policies.base import drop_schedule
from skipvision.skip.policies.none import NoSkip


@SKIP_POLICIES.register("pyramid_drop", tiny={"layers": [1], "ratio": 0.5})
class PyramidDrop(NoSkip):
    """``layers``: the stage boundaries K (each the first decoder layer without that stage's drops), strictly
    increasing and >= 1; None: the paper's 8/16/24 of 32 scaled to the LLM's depth (``round(L * k / 4)`` for k = 1..3,
    deduplicated, within 1..L - 1). ``ratio`` in (0, 1): the share of the current image tokens dropped at each
    boundary (per row ``floor(ratio * candidates)``); the paper's default 0.5. The same stages run in training and at
    inference (:meth:`~skipvision.skip.policies.base.SkipPolicy.drop_stages`)."""

    def __init__(self, layers: Sequence[int] | None = None, ratio: float = 0.5) -> None:
        super().__init__()
        self.drop = drop_schedule("pyramid_drop", layers, ratio)
