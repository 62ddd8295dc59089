"""mod_router peer: a learned router per decoder layer keeps that layer's top share of image tokens (docs/method.md
"Peers").

p-MoD (Zhang et al., ICCV 2025) builds mixture-of-depths VLMs: in each layer a router scores the image tokens and
only the top share of them is processed; the share decays with depth (progressive ratio decay, a shifted cosine).
The choice is per layer and per sample, made on the layer's input just before the layer runs (a forward pre-hook,
installed once with the model). What the unchosen image tokens of a layer skip:

* ``mode: ffn``: its FFN, through Skip-FFN's per-layer plans (skipvision/skip/ffn.py); they still take part in
  attention, as Skip-Vision's S tokens do, and the KV cache is untouched;
* ``mode: layer`` (p-MoD's own): the whole layer; it runs on the text and the chosen image tokens only (true
  positions, a mask built from them), the others pass unchanged, and the layer's KV cache never holds them.

Training: top-k has no gradient, so each chosen token's FFN output ``f`` is returned as ``f + f * (g - g.detach())``
with ``g = sigmoid(router score)`` (``mode: layer``: its layer output ``out`` as ``out + (out - in) * (g -
g.detach())``): equal in value (exactly), while the task loss's gradient reaches the router through the chosen
tokens' outputs. The hooks stay attached, so a layer that gradient checkpointing recomputes finds its FFN gate.
Every router runs in every forward, also on a batch without images, so all ranks call the same modules (SPMD).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.profiler import record_function
from torch.utils.hooks import RemovableHandle

from skipvision.adapters import SLIDING, DecoderAdapter, adapter_for
from skipvision.costs import LayerTokens, TokenSchedule
from skipvision.errors import MethodError
from skipvision.inference.kv import Removal, prune_mask
from skipvision.registry import SKIP_POLICIES
from skipvision.skip.dropping import gather, lowest_scored, subset_kwargs
from skipvision.skip.ffn import SkipFFN
from skipvision.skip.layout import SlotLayout
from skipvision.skip.policies.none import NoSkip

MODES = ("ffn", "layer")


def shifted_cosine(num_layers: int, min_ratio: float) -> list[float]:
    """Per-layer keep ratios decaying from near 1 to ``min_ratio``: ``min + (1 - min) * (1 + cos(pi * (l + 1) / L))
    / 2`` for layer l of L; shifted by one layer so that the first layer already routes and the last keeps
    ``min_ratio`` (p-MoD's progressive ratio decay, in our parameterisation)."""
    return [min_ratio + (1 - min_ratio) * (1 + math.cos(math.pi * (i + 1) / num_layers)) / 2 for i in range(num_layers)]


@SKIP_POLICIES.register("mod_router", tiny={"min_ratio": 0.5})
class ModRouter(NoSkip):
    """A ``Linear(dim, 1)`` router per decoder layer scores the image tokens on the layer's input; the top
    ``ratios[l]`` share of each row's image tokens runs layer l's FFN, the rest skip it (per row
    ``floor((1 - ratio) * image slots)`` skip). ``ratios`` (one keep ratio in (0, 1] per layer) or, by default, the
    shifted cosine from near 1 down to ``min_ratio`` (:func:`shifted_cosine`). ``mode``: ``ffn`` (the unchosen
    tokens skip the FFN only) or ``layer`` (they skip the whole layer, as in p-MoD: the layer runs on the text and
    the chosen image tokens, so the others are neither queries nor keys there, and that layer's KV cache never holds
    them; full-attention families only). ``dim`` and ``num_layers`` are wired by the framework."""

    def __init__(
        self,
        dim: int,
        num_layers: int,
        ratios: Sequence[float] | None = None,
        min_ratio: float = 0.25,
        mode: str = "ffn",
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise MethodError(f"mod_router: mode must be one of {', '.join(MODES)}, got {mode!r}")
        if not 0 < min_ratio <= 1:
            raise MethodError(f"mod_router: min_ratio (the last layer's keep ratio) must be in (0, 1], got {min_ratio}")
        ratios = shifted_cosine(num_layers, min_ratio) if ratios is None else [float(r) for r in ratios]
        if len(ratios) != num_layers or not all(0 < r <= 1 for r in ratios):
            raise MethodError(
                f"mod_router: ratios must be {num_layers} keep ratios in (0, 1], one per decoder layer; got {ratios}"
            )
        self.ratios = tuple(ratios)
        self.mode = mode
        self.routers = nn.ModuleList(nn.Linear(dim, 1) for _ in range(num_layers))
        self._slots: torch.Tensor | None = None  # [B, T] bool, the image slots of the forwards being routed
        self._gates: dict[int, torch.Tensor] = {}  # layer -> [B, T, 1], the chosen image rows' gate g - g.detach()
        self._handles: list[RemovableHandle] = []
        self._mask: torch.Tensor | None = None  # [B, T] the routed forwards' 2-D mask (layer mode)
        self._positions: torch.Tensor | None = None  # [B, T] their true positions (layer mode)
        self._inputs: dict[int, tuple[torch.Tensor, Removal, torch.Tensor]] = {}  # layer mode: layer -> its input
        # [B, T, D], the rows it runs on, their gates [B, T_l, 1]
        self._columns: dict[int, Removal] = {}  # layer mode: the rows each layer ran on in the last routed forward
        self._adapter: DecoderAdapter | None = None

    def routed_layers(self, num_layers: int) -> tuple[int, ...]:
        """Every decoder layer (each router runs in every forward, SPMD)."""
        if num_layers != len(self.routers):
            raise MethodError(f"mod_router: built for {len(self.routers)} decoder layers, the LLM has {num_layers}")
        return tuple(range(num_layers))

    def skipped_share(self, layer: int) -> float:
        """The share of a row's image tokens that skips ``layer``'s FFN: ``1 - ratios[layer]``."""
        return 1 - self.ratios[layer]

    def attach(self, backbone: nn.Module, skip_ffn: SkipFFN) -> None:
        """A pre-hook on each decoder layer routes its input. ``ffn`` mode: a forward hook on the layer's MLP gates
        the chosen rows; ``layer`` mode: the pre-hook hands the layer the chosen rows only and a forward hook on the
        layer scatters its output back."""
        if self._handles:
            raise RuntimeError("mod_router: its hooks are attached to a backbone already")
        adapter = adapter_for(backbone.config)
        if self.mode == "layer" and SLIDING in adapter.layer_types:
            raise MethodError(
                f"mod_router: mode layer runs on full-attention decoders only; {backbone.config.model_type} has "
                "sliding-window layers (use mode ffn)"
            )
        self._adapter = adapter
        for i, layer in enumerate(adapter.layers(backbone)):
            hook = partial(self._route, i, skip_ffn)
            self._handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
            if self.mode == "ffn":
                self._handles.append(adapter.mlp(layer).register_forward_hook(partial(self._gate, i)))
            else:
                self._handles.append(layer.register_forward_hook(partial(self._restore, i)))

    def llm_modules(self) -> list[nn.Module]:
        return list(self.routers)

    def route(
        self,
        visual_slots: torch.Tensor | None,
        attention_mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> None:
        self._slots, self._mask, self._positions = visual_slots, attention_mask, positions  # [B, T] each
        self._columns = {}

    def layer_columns(self) -> list[Removal] | None:
        """``layer`` mode, after a routed prefill: the prompt rows each layer ran on, which its cache holds."""
        if self.mode != "layer" or len(self._columns) != len(self.routers):
            return None
        return [self._columns[i] for i in range(len(self.routers))]

    def _route(
        self, layer: int, skip_ffn: SkipFFN, _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        """Before decoder ``layer``: score its input ``args[0]`` [B, T, D] and choose its image rows: the FFN plan
        and gates (``ffn``), or the layer's reduced input and kwargs (``layer``). Inputs of another [B, T] than the
        routed slots' (decode steps) run unrouted."""
        hidden = args[0]  # [B, T, D]
        if self._slots is None or tuple(hidden.shape[:2]) != tuple(self._slots.shape):
            self._gates.pop(layer, None)
            return None
        with record_function("skipvision::mod_router_route"):
            scores = self.routers[layer](hidden).squeeze(-1).float()  # [B, T]
            slots = self._slots.to(hidden.device)
            skipped = lowest_scored(scores.detach(), slots, self.skipped_share(layer))  # [B, T]
            gate = torch.sigmoid(scores)  # [B, T]
            chosen = (slots & ~skipped).to(hidden.dtype)  # [B, T]
            delta = ((gate - gate.detach()).to(hidden.dtype) * chosen).unsqueeze(-1)  # [B, T, 1], zero in value
            if self.mode == "ffn":
                skip_ffn.plan_layer(layer, ~skipped)
                self._gates[layer] = delta
                return None
            return self._reduce(layer, hidden, skipped, delta, args, kwargs)

    def _reduce(
        self,
        layer: int,
        hidden: torch.Tensor,
        skipped: torch.Tensor,
        delta: torch.Tensor,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """``layer`` mode: the layer's input gathered to the rows it runs on (text and chosen image tokens; rows
        that skip more keep some skipped ones as masked fillers), with their true positions, (cos, sin) and mask."""
        plan = Removal.plan(~skipped)  # [B, T_l]
        index = plan.index.to(hidden.device)
        self._columns[layer] = plan
        self._inputs[layer] = (hidden, plan, gather(delta, index))
        reduced = gather(hidden, index)  # [B, T_l, D]
        positions = self._positions.to(hidden.device).gather(1, index)  # [B, T_l], true
        mask = prune_mask(self._mask, plan).to(hidden.device)  # [B, T_l], fillers 0
        layer_mask = self._adapter.type_masks(reduced, positions, positions, mask)[self._adapter.layer_types[layer]]
        return (reduced, *args[1:]), subset_kwargs(kwargs, index, positions, layer_mask)

    def _restore(self, layer: int, _module: nn.Module, _args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        """``layer`` mode, after decoder ``layer``: its output [B, T_l, D] back into its input [B, T, D]; the chosen
        image rows as ``out + (out - in) * (g - g.detach())``, fillers and skipped rows unchanged."""
        entry = self._inputs.pop(layer, None)
        if entry is None:
            return output
        hidden, plan, delta = entry
        index = plan.index.to(output.device)
        before = gather(hidden, index)  # [B, T_l, D]
        out = torch.where(plan.valid.to(output.device)[..., None], output + (output - before) * delta, before)
        return hidden.scatter(1, index[..., None].expand(-1, -1, hidden.shape[-1]), out)  # [B, T, D]

    def _gate(self, layer: int, _module: nn.Module, _args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        """After decoder ``layer``'s MLP: ``output + output * (g - g.detach())`` at the chosen image rows."""
        gate = self._gates.get(layer)
        if gate is None or gate.shape[:2] != output.shape[:2]:
            return output
        return output + output * gate  # [B, T, D]

    def schedule(
        self,
        num_layers: int,
        text: int,
        layout: SlotLayout,
        images: int = 1,
        training: bool = False,
        ffn_layers: Collection[int] | None = None,
    ) -> TokenSchedule:
        """``ffn``: every token present in every layer and cached; in layer l, ``floor((1 - ratios[l]) * image
        slots)`` of them skip the FFN. ``layer``: those tokens are absent from layer l, attention and cache included.
        The router scores every token in both."""
        self.routed_layers(num_layers)
        visual = layout.slots * images
        tokens = text + visual
        skipped = [math.floor(visual * self.skipped_share(i)) for i in range(num_layers)]
        if self.mode == "ffn":
            return TokenSchedule(tuple(LayerTokens(tokens, tokens - s, routed=tokens) for s in skipped), tokens)
        layers = tuple(LayerTokens(tokens - s, tokens - s, routed=tokens) for s in skipped)  # routed before the cut
        return TokenSchedule(layers, tuple(tokens - s for s in skipped), length=tokens)
