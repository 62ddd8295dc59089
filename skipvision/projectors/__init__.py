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


@PROJECTORS.register("mlp2x_gelu")
def mlp2x_gelu(in_dim: int, out_dim: int, weights: str | None = None, activation: str | None = None) -> nn.Module:
    """Two-layer MLP with GELU, as in LLaVA-1.5.

    ``weights``: an HF LLaVA folder (its ``multi_modal_projector``, with the folder's activation and bias), the
    original LLaVA's stage-1 ``mm_projector.bin`` or a safetensors file, loaded strictly (docs/checkpoints.md).
    ``activation``: a transformers activation name; default the folder's, else ``gelu``.
    """
    folder = llava_config(weights) if weights is not None and Path(weights).is_dir() else None
    activation = activation or (folder or {}).get("projector_hidden_act", "gelu")
    bias = bool((folder or {}).get("multimodal_projector_bias", True))
    act = nn.GELU() if activation == "gelu" else ACT2FN[activation]
    proj = nn.Sequential(nn.Linear(in_dim, out_dim, bias=bias), act, nn.Linear(out_dim, out_dim, bias=bias))
    if weights is not None and not building_skeleton():
        load_strict(proj, read_projector_file(weights), f"{weights} (projector)")
    return proj


@PROJECTORS.register("linear")
def linear(in_dim: int, out_dim: int) -> nn.Module:
    """A single linear map, as in the original LLaVA."""
    return nn.Linear(in_dim, out_dim)
