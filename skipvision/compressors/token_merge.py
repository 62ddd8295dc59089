"""Bipartite mean token merge: the paper's compressor for the skipped candidate group C -> S.

The method is in docs/method.md "Token pipeline", step 4.

Tokens are matched by cosine similarity: the ``r = n - n_out`` most redundant tokens (largest row sum of the
similarity matrix with a zeroed diagonal) are *sources*, the others *destinations*. Each source is averaged into its
most similar destination, so an output token is the plain mean of its destination and the sources assigned to it.
The matching runs without gradient; the averaging is differentiable w.r.t. the features. Unlike the paper's code,
which emits destinations in redundancy order, the destinations keep their original (spatial) order.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from skipvision.registry import COMPRESSORS


def check_num_out(n: int, num_out: int) -> None:
    """Raise ValueError unless ``1 <= num_out <= n``: a compressor keeps at least one token and never adds any."""
    if not 1 <= num_out <= n:
        raise ValueError(f"num_out must satisfy 1 <= num_out <= n = {n} (the number of input tokens); got {num_out}")


class MergePlan(NamedTuple):
    """Which output slot every input token goes to, and which token is each slot's destination."""

    assignment: Tensor  # [B, n] long, output slot of each input token
    destinations: Tensor  # [B, n_out] long, input index of each slot's destination, increasing


@torch.no_grad()
def plan_merge(x: Tensor, num_out: int) -> MergePlan:
    """Bipartite matching of ``x`` [B, n, D] down to ``num_out`` tokens (no gradient; see the module docstring)."""
    if x.dim() != 3:
        raise ValueError(f"token merge expects x of shape [B, n, D]; got {tuple(x.shape)}")
    batch, n, _ = x.shape
    check_num_out(n, num_out)
    xn = F.normalize(x.float(), dim=-1)  # [B, n, D]
    sim = xn @ xn.transpose(1, 2)  # [B, n, n]
    sim.diagonal(dim1=1, dim2=2).zero_()
    order = sim.sum(dim=-1).argsort(dim=-1, descending=True, stable=True)  # [B, n], most redundant first
    destinations = order[:, n - num_out :].sort(dim=-1).values  # [B, n_out], spatial order
    to_dst = sim.gather(2, destinations[:, None, :].expand(batch, n, num_out))  # [B, n, n_out]
    assignment = to_dst.argmax(dim=-1)  # [B, n], most similar destination's slot (used for sources)
    slots = torch.arange(num_out, device=x.device).expand(batch, num_out)  # [B, n_out]
    assignment.scatter_(1, destinations, slots)  # a destination goes to its own slot
    return MergePlan(assignment, destinations)


def merge_assignment(x: Tensor, num_out: int) -> Tensor:
    """For each token of ``x`` [B, n, D], the output slot it is merged into: LongTensor [B, n] in [0, num_out)."""
    return plan_merge(x, num_out).assignment


def merge_tokens(x: Tensor, num_out: int) -> Tensor:
    """Merge ``x`` [B, n, D] into [B, num_out, D]; each output is the mean of the tokens assigned to it.

    ``num_out == n`` returns ``x`` itself. Sums and counts are accumulated in float32 and cast back to x's dtype.
    """
    batch, n, dim = x.shape
    check_num_out(n, num_out)
    if num_out == n:
        return x
    assignment = merge_assignment(x, num_out)  # [B, n]
    sums = x.new_zeros(batch, num_out, dim, dtype=torch.float32)
    sums = sums.scatter_add(1, assignment[..., None].expand(batch, n, dim), x.float())  # [B, n_out, D]
    counts = x.new_zeros(batch, num_out, dtype=torch.float32)
    counts = counts.scatter_add(1, assignment, counts.new_ones(batch, n))  # [B, n_out], >= 1
    return (sums / counts[..., None]).to(x.dtype)


@COMPRESSORS.register("token_merge", tiny={})
class TokenMerge(nn.Module):
    """Bipartite mean token merge with destinations in spatial order; no parameters."""

    def forward(self, x: Tensor, num_out: int) -> Tensor:
        """[B, n, D] -> [B, num_out, D]."""
        return merge_tokens(x, num_out)
