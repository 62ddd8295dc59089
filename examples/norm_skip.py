"""norm_skip: a token-skipping method written as a third-party plugin against skipvision's method interface only
(docs/methods.md "Write your own method").

From decoder layer ``start`` on, the ``share`` of each sample's image tokens whose hidden state entering the layer
has the smallest L2 norm skip that layer's FFN; they stay in attention and in the KV cache. Training-free: no
parameters. Load it with a recipe's ``imports: [norm_skip]`` and this folder on PYTHONPATH.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from functools import partial

import torch
from torch import nn

from skipvision.adapters import decoder_layers
from skipvision.costs import LayerTokens, TokenSchedule
from skipvision.registry import SKIP_POLICIES
from skipvision.skip.dropping import lowest_scored
from skipvision.skip.ffn import SkipFFN
from skipvision.skip.layout import SlotLayout
from skipvision.skip.policies.none import NoSkip


@SKIP_POLICIES.register("norm_skip", tiny={"start": 1, "share": 0.5})
class NormSkip(NoSkip):
    """From layer ``start`` on, the ``share`` of image tokens with the smallest hidden-state norm skip the FFN."""

    def __init__(self, start: int = 1, share: float = 0.5) -> None:
        super().__init__()  # the layout: every visual token, in order, all full-compute before the LLM
        if start < 0 or not 0 < share < 1:
            raise ValueError(f"norm_skip: need start >= 0 and share in (0, 1), got start={start}, share={share}")
        self.start, self.share = start, share
        self.slots: torch.Tensor | None = None  # [B, T] bool, the image slots of the forwards being routed

    def routed_layers(self, num_layers: int) -> tuple[int, ...]:
        return tuple(range(self.start, num_layers))  # the model attaches Skip-FFN to these, then calls attach()

    def attach(self, backbone: nn.Module, skip_ffn: SkipFFN) -> None:
        layers = decoder_layers(backbone)
        for i in self.routed_layers(len(layers)):
            layers[i].register_forward_pre_hook(partial(self._plan, i, skip_ffn))

    def route(self, visual_slots: torch.Tensor | None, *_: torch.Tensor | None) -> None:
        self.slots = visual_slots  # set before every forward over a whole sequence

    def _plan(self, layer: int, skip_ffn: SkipFFN, _module: nn.Module, args: tuple) -> None:
        hidden = args[0]  # [B, T, D], this layer's input
        if self.slots is not None and tuple(hidden.shape[:2]) == tuple(self.slots.shape):  # decode steps: plain FFN
            skipped = lowest_scored(hidden.norm(dim=-1), self.slots.to(hidden.device), self.share)  # [B, T]
            skip_ffn.plan_layer(layer, ~skipped)

    def schedule(
        self,
        num_layers: int,
        text: int,
        layout: SlotLayout,
        images: int = 1,
        training: bool = False,
        ffn_layers: Collection[int] | None = None,
    ) -> TokenSchedule:
        tokens = text + layout.slots * images
        skipped = math.floor(layout.slots * images * self.share)  # per row, as lowest_scored counts
        counts = [LayerTokens(tokens, tokens - (skipped if i >= self.start else 0)) for i in range(num_layers)]
        return TokenSchedule(tuple(counts), cached=tokens)
