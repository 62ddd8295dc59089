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

from collections.abc import Sequence
from types import TracebackType
from typing import Any

import torch
from torch import nn
from torch.profiler import record_function

from skipvision.adapters import adapter_for


class SkipFFN:
    """Run the FFN of the selected decoder layers only on the rows a plan marks as "FFN" (docs/method.md "The
    Skip-FFN layer").

    Usage::

        with SkipFFN(model, layers=None) as skip:   # None = every layer
            skip.set_plan(ffn_mask)                 # [B, T] bool, True = run the FFN on that token
            logits = model(inputs_embeds=embeds).logits

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
                raise ValueError(f"Skip-FFN layer index {i} is out of range: valid indices are {-n}..{n - 1}")
            resolved.append(i % n)
        self.layers: tuple[int, ...] = tuple(sorted(set(resolved)))
        self._all_mlps: list[nn.Module] = [adapter.mlp(layer) for layer in all_layers]
        self._mlps: list[nn.Module] = [self._all_mlps[i] for i in self.layers]
        self._shape: tuple[int, int] | None = None  # [B, T] of the current plan
        self._keep: torch.Tensor | None = None  # [n_keep] flat row indices of the FFN rows
        self._attached = False

    @property
    def attached(self) -> bool:
        """Whether the MLP overrides are installed."""
        return self._attached

    def set_plan(self, ffn_mask: torch.Tensor | None) -> None:
        """Set (or clear, with None) the plan: ``ffn_mask`` [B, T] bool, True = run the FFN on that row.

        A plan that keeps every row is the same as no plan: the MLP runs on the unpacked input.

        The flat indices of the kept rows are computed once here and shared by every hooked layer.
        """
        if ffn_mask is None:
            self._shape, self._keep = None, None
            return
        if ffn_mask.dim() != 2 or ffn_mask.dtype != torch.bool:
            raise ValueError(f"ffn_mask must be a [B, T] bool tensor, got {ffn_mask.dtype} {tuple(ffn_mask.shape)}")
        with record_function("skipvision::skip_ffn_plan"):
            if bool(ffn_mask.all()):  # nothing skipped: the plain MLP, no gather/scatter (the bench's hook overhead)
                self._shape, self._keep = None, None
                return
            self._shape = (ffn_mask.shape[0], ffn_mask.shape[1])
            self._keep = ffn_mask.flatten().nonzero().squeeze(1)  # [n_keep]

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
        for mlp in self._mlps:
            mlp.forward = PlannedForward(self, mlp)
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


class PlannedForward:
    """The instance-level ``forward`` of one hooked MLP: the class forward on the plan's kept rows, zeros elsewhere.

    A callable object rather than a closure, so ``copy.deepcopy`` and pickling of the model carry it along: a copy's
    MLPs then follow the copy's own SkipFFN plan and weights, never the original's.
    """

    def __init__(self, skip: SkipFFN, mlp: nn.Module) -> None:
        self.skip = skip
        self.mlp = mlp

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        original = type(self.mlp).forward
        keep = self.skip._keep
        if keep is None or tuple(x.shape[:-1]) != self.skip._shape:
            return original(self.mlp, x, *args, **kwargs)  # no plan, decode step or text-only call: plain MLP
        b, t, d = x.shape
        with record_function("skipvision::skip_ffn_gather"):
            keep = keep.to(x.device)  # [n_keep]
            rows = x.reshape(b * t, d).index_select(0, keep).unsqueeze(0)  # [1, n_keep, D]
        # Always called, even with n_keep == 0 ([1, 0, D]), so collectives match across ranks.
        y = original(self.mlp, rows, *args, **kwargs).squeeze(0)  # [n_keep, D]
        with record_function("skipvision::skip_ffn_scatter"):
            out = y.new_zeros(b * t, y.shape[-1]).index_copy(0, keep, y)  # [B*T, D]
        return out.reshape(b, t, -1)  # [B, T, D]
