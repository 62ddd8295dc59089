"""FastV peer: training-free pruning of the least-attended image tokens inside the LLM (docs/method.md "Peers").

At the token stage it is the full model (every token retained, no merge, every slot runs the FFN). At prefill,
layer K drops the ``ratio`` share of each prompt's image tokens that the last prompt token attends to least in
layer K - 1; layers K.. and the decode steps never see them (skipvision/skip/fastv.py does the pruning).
"""

from __future__ import annotations

from skipvision.errors import MethodError
from skipvision.registry import SKIP_POLICIES
from skipvision.skip.layout import DropStage
from skipvision.skip.policies.none import NoSkip


def check_fastv(layer: int, ratio: float) -> None:
    """Raise ValueError unless ``layer`` >= 1 and 0 < ``ratio`` < 1 (the backbone's depth is checked at prefill)."""
    if layer < 1:
        raise MethodError(f"fastv: layer (K, the first layer without the dropped tokens) must be >= 1, got {layer}")
    if not 0 < ratio < 1:
        raise MethodError(f"fastv: ratio (share of image tokens dropped) must be in (0, 1), got {ratio}")


@SKIP_POLICIES.register("fastv", tiny={"layer": 1, "ratio": 0.5})
class FastV(NoSkip):
    """``layer`` K >= 1: the first decoder layer that no longer sees the dropped tokens; ``ratio`` in (0, 1): the
    share of each row's image tokens dropped there (per row ``floor(ratio * image slots)``). The defaults are the
    FastV paper's K=2, R=50%."""

    def __init__(self, layer: int = 2, ratio: float = 0.5) -> None:
        super().__init__()
        check_fastv(layer, ratio)
        self.layer = layer
        self.ratio = ratio

    def drop_stages(self, num_layers: int, training: bool) -> tuple[DropStage, ...]:
        """One stage at inference; none in training (FastV is training-free: its training step is the full
        model's). ``num_layers`` is checked against K where the stage runs."""
        return () if training else (DropStage(self.layer, self.ratio),)
