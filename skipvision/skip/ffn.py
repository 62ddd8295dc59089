"""Skip-FFN on an unmodified Hugging Face causal LM (docs/method.md "The Skip-FFN layer").

Every supported decoder layer adds its FFN's output to the residual stream (``h = h + mlp(norm(h))``; Gemma and
OLMo2 put a norm after the MLP, which maps zeros to zeros). :class:`SkipFFN` overrides the ``forward`` attribute of
each selected layer's MLP *instance* (found through the family's decoder adapter) so that the real MLP runs only on
the rows a plan marks as "FFN" and returns zeros on the others: a skipped token then keeps the attention residual
only, which is exactly Skip-FFN, while still taking part in attention as query, key and value. No module is
replaced, so parameter names, ``state_dict`` keys and FSDP wrapping are untouched, and :meth:`SkipFFN.detach`
restores the model exactly (docs/design.md "Skip-Vision core").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.profiler import record_function

from skipvision.adapters import adapter_for
from skipvision.errors import MethodError


class SkipFFN:
    """Run the FFN of the selected decoder layers only on the rows a plan marks as "FFN" (docs/method.md "The
    Skip-FFN layer").

    Usage::

        with SkipFFN(model, layers=None) as skip:   # None = every layer
            skip.set_plan(ffn_mask)                 # [B, T] bool, True = run the FFN on that token
            logits = model(inputs_embeds=embeds).logits
            skip.set_plan({0: mask_0, -1: mask_last})  # per layer; the other hooked layers run the plain MLP

    The plan persists until replaced or cleared, so HF gradient checkpointing, which re-runs layer forwards during
    backward, recomputes with the same plan. Calls whose [B, T] differs from the plan's (decode steps with T=1,
    text-only batches) run the plain MLP. The real MLP is called on every call, even with zero kept rows, so DDP/FSDP
    collectives stay matched across ranks (SPMD safety).
    """

    def __init__(self, model: nn.Module, layers: Sequence[int] | None = None) -> None:
        adapter = adapter_for(model.config)
        all_layers = adapter.layers(model)
        n = len(all_layers)
        indices = range(n) if layers is None else layers
        resolved: list[int] = []
        for i in indices:
            if not -n <= i < n:
                raise MethodError(f"Skip-FFN layer index {i} is out of range: valid indices are {-n}..{n - 1}")
            resolved.append(i % n)
        self.layers: tuple[int, ...] = tuple(sorted(set(resolved)))
        self._all_mlps: list[nn.Module] = [adapter.mlp(layer) for layer in all_layers]
        self._mlps: list[nn.Module] = [self._all_mlps[i] for i in self.layers]
        self._plans: dict[int, Packing] = {}  # hooked layer -> its packing; absent = plain MLP
        self._attached = False

    @property
    def attached(self) -> bool:
        """Whether the MLP overrides are installed."""
        return self._attached

    def set_plan(self, plan: torch.Tensor | Mapping[int, torch.Tensor] | None) -> None:
        """Set (or clear, with None) the plan: which rows run the FFN in each hooked layer.

        ``plan`` is one ``ffn_mask`` [B, T] bool (True = run the FFN on that row), the same rows in every hooked
        layer, or a per-layer plan ``{decoder layer index: ffn_mask}`` for methods whose FFN rows differ per layer
        (a per-layer router). Indices are those of the constructor's ``layers`` (negatives count from the end); a
        hooked layer missing from the mapping runs its plain MLP. A mask that keeps every row is the same as no mask:
        that layer's MLP runs on the unpacked input.

        The flat indices of the kept rows are computed once per distinct mask object, so layers given the same mask
        share them. On an error the previous plan stays.
        """
        if plan is None:
            self._plans = {}
            return
        per_layer = not isinstance(plan, torch.Tensor)
        masks = self._resolve(plan) if per_layer else dict.fromkeys(self.layers, plan)
        packings: dict[int, Packing | None] = {}  # id(mask) -> its packing, None = keeps every row
        plans: dict[int, Packing] = {}
        with record_function("skipvision::skip_ffn_plan"):
            for layer, mask in masks.items():  # `masks` holds every mask, so ids stay unique during the loop
                if id(mask) not in packings:
                    packings[id(mask)] = _pack(mask, f"ffn_mask for decoder layer {layer}" if per_layer else "ffn_mask")
                packing = packings[id(mask)]
                if packing is not None:
                    plans[layer] = packing
        self._plans = plans

    def plan_layer(self, layer: int, mask: torch.Tensor) -> None:
        """Set one hooked ``layer``'s rows to ``mask`` [B, T] bool, keeping the other layers' plans: for methods that
        choose a layer's rows inside the forward, just before it runs (a router on the layer's input)."""
        (layer, mask), = self._resolve({layer: mask}).items()
        packing = _pack(mask, f"ffn_mask for decoder layer {layer}")
        if packing is None:
            self._plans.pop(layer, None)
        else:
            self._plans[layer] = packing

    def _resolve(self, plan: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """A per-layer plan with its indices resolved to hooked layers; an index this SkipFFN does not hook, or two
        indices naming one layer, is an error."""
        if not isinstance(plan, Mapping):
            raise TypeError(f"a plan is a [B, T] bool tensor or a mapping {{layer: mask}}, got {type(plan).__name__}")
        n = len(self._all_mlps)
        masks: dict[int, torch.Tensor] = {}
        for index, mask in plan.items():
            layer = index % n if -n <= index < n else index
            if layer not in self.layers:
                raise ValueError(
                    f"the plan names decoder layer {index}, which this SkipFFN does not hook: "
                    f"hooked layers are {list(self.layers)} (the model has {n})"
                )
            if layer in masks:
                raise ValueError(f"the plan names decoder layer {layer} twice ({index} resolves to it)")
            masks[layer] = mask
        return masks

    def attach(self) -> SkipFFN:
        """Install the MLP overrides (idempotent). Fails if any MLP of the model already has an instance override."""
        if self._attached:
            return self
        taken = [i for i, mlp in enumerate(self._all_mlps) if "forward" in mlp.__dict__]
        if taken:
            raise RuntimeError(
                f"the MLPs of decoder layers {taken} already have an instance-level forward override "
                "(is another SkipFFN attached to this model?); detach it first"
            )
        for layer, mlp in zip(self.layers, self._mlps, strict=True):
            mlp.forward = PlannedForward(self, mlp, layer)
        self._attached = True
        return self

    def detach(self) -> None:
        """Remove the overrides: each MLP falls back to its class ``forward``. The plan is kept."""
        if not self._attached:
            return
        for mlp in self._mlps:
            del mlp.forward
        self._attached = False

    def __enter__(self) -> SkipFFN:
        return self.attach()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.detach()


class Packing(NamedTuple):
    """One mask's packing: the [B, T] it was planned for and the flat indices of its kept rows."""

    shape: tuple[int, int]  # [B, T]
    keep: torch.Tensor  # [n_keep] flat row indices of the FFN rows


def _pack(mask: torch.Tensor, name: str) -> Packing | None:
    """The packing of ``mask`` [B, T] bool (True = run the FFN on that row), or None when it keeps every row: nothing
    skipped means the plain MLP, with no gather/scatter (the bench's hook overhead). ``name`` labels errors."""
    if mask.dim() != 2 or mask.dtype != torch.bool:
        raise ValueError(f"{name} must be a [B, T] bool tensor, got {mask.dtype} {tuple(mask.shape)}")
    if bool(mask.all()):
        return None
    return Packing((mask.shape[0], mask.shape[1]), mask.flatten().nonzero().squeeze(1))  # keep: [n_keep]


class PlannedForward:
    """The instance-level ``forward`` of one hooked MLP: the class forward on its layer's kept rows, zeros elsewhere.

    A callable object rather than a closure, so ``copy.deepcopy`` and pickling of the model carry it along: a copy's
    MLPs then follow the copy's own SkipFFN plan and weights, never the original's. It knows its decoder layer's
    index, which selects its rows in a per-layer plan.
    """

    def __init__(self, skip: SkipFFN, mlp: nn.Module, layer: int) -> None:
        self.skip = skip
        self.mlp = mlp
        self.layer = layer

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        original = type(self.mlp).forward
        plan = self.skip._plans.get(self.layer)
        if plan is None or tuple(x.shape[:-1]) != plan.shape:
            return original(self.mlp, x, *args, **kwargs)  # no rows planned, decode step or text-only call: plain MLP
        b, t, d = x.shape
        with record_function("skipvision::skip_ffn_gather"):
            keep = plan.keep.to(x.device)  # [n_keep]
            rows = x.reshape(b * t, d).index_select(0, keep).unsqueeze(0)  # [1, n_keep, D]
        # Always called, even with n_keep == 0 ([1, 0, D]), so collectives match across ranks.
        y = original(self.mlp, rows, *args, **kwargs).squeeze(0)  # [n_keep, D]
        with record_function("skipvision::skip_ffn_scatter"):
            out = y.new_zeros(b * t, y.shape[-1]).index_copy(0, keep, y)  # [B*T, D]
        return out.reshape(b, t, -1)  # [B, T, D]
