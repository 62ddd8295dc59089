"""Projectors map vision features [B, N, C_v] to the LLM's embedding width [B, N, D].

Step 2 of docs/method.md "Token pipeline".
"""

from pathlib import Path

from torch import nn
from transformers.activations import ACT2FN

from skipvision.registry import PROJECTORS
from skipvision.skeleton import building_skeleton
from skipvision.weights.llava import llava_config, read_projector_file
from skipvision.weights.strict import load_strict


class MLPProjector(nn.Sequential):
    """``Linear -> activation -> Linear`` (state dict keys ``0.*`` and ``2.*``, LLaVA's own), remembering the
    activation's name and the bias so an export can rebuild it from configuration (skipvision/inference/export.py)."""

    def __init__(self, in_dim: int, out_dim: int, activation: str, bias: bool) -> None:
        act = nn.GELU() if activation == "gelu" else ACT2FN[activation]
        super().__init__(nn.Linear(in_dim, out_dim, bias=bias), act, nn.Linear(out_dim, out_dim, bias=bias))
        self.activation, self.bias = activation, bias


@PROJECTORS.register("mlp2x_gelu")
def mlp2x_gelu(
    in_dim: int, out_dim: int, weights: str | None = None, activation: str | None = None, bias: bool | None = None
) -> nn.Module:
    """Two-layer MLP with GELU, as in LLaVA-1.5.

    ``weights``: an HF LLaVA folder (its ``multi_modal_projector``, with the folder's activation and bias), the
    original LLaVA's stage-1 ``mm_projector.bin`` or a safetensors file, loaded strictly (docs/checkpoints.md).
    ``activation``: a transformers activation name; ``bias``: whether the linears have one; default the folder's,
    else ``gelu`` and True.
    """
    folder = llava_config(weights) if weights is not None and Path(weights).is_dir() else None
    activation = activation or (folder or {}).get("projector_hidden_act", "gelu")
    bias = bool((folder or {}).get("multimodal_projector_bias", True)) if bias is None else bias
    proj = MLPProjector(in_dim, out_dim, activation, bias)
    if weights is not None and not building_skeleton():
        load_strict(proj, read_projector_file(weights), f"{weights} (projector)")
    return proj


@PROJECTORS.register("linear")
def linear(in_dim: int, out_dim: int) -> nn.Module:
    """A single linear map, as in the original LLaVA."""
    return nn.Linear(in_dim, out_dim)
