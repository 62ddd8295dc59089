"""Projectors map vision features [B, N, C_v] to the LLM's embedding width [B, N, D].

Step 2 of docs/method.md "Token pipeline".
"""

from torch import nn

from skipvision.registry import PROJECTORS


@PROJECTORS.register("mlp2x_gelu")
def mlp2x_gelu(in_dim: int, out_dim: int) -> nn.Module:
    """Two-layer MLP with GELU, as in LLaVA-1.5."""
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))


@PROJECTORS.register("linear")
def linear(in_dim: int, out_dim: int) -> nn.Module:
    """A single linear map, as in the original LLaVA."""
    return nn.Linear(in_dim, out_dim)
