"""FSDP2: the model sharded per decoder layer and per encoder block, built without a full copy on every rank
(docs/distributed.md "FSDP").

``trainer.strategy=fsdp`` runs Lightning's ``ModelParallelStrategy`` (PyTorch's ``fully_shard``, which also runs on
CPU with gloo), not Lightning's FSDP1 strategy. The LightningModule builds the model on the meta device and, in
``configure_model``:

1. shards it (:func:`shard`): one unit per encoder block and decoder layer, per module the method calls from inside
   the LLM (a router per layer), one for the input embeddings, and one for
   each part the model calls directly (encoder, projector, skip tokens, backbone) so that calls which bypass the root
   module's ``forward`` (generation, the encoder's [CLS]-attention pass) still gather their parameters; the root last;
2. allocates each rank's shards and fills them from rank 0's fully built model (:func:`load_from_rank0`): only rank 0
   ever holds the whole model, and every rank ends with exactly the weights a single process would have built.

Frozen components are sharded like the others: every rank calls every module every step (docs/distributed.md "SPMD"),
so their all-gathers always match, and frozen units simply have no gradient reduce-scatter.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from skipvision.adapters import decoder_layers
from skipvision.model import VisionLanguageModel

FSDP_STRATEGIES = ("fsdp", "model_parallel")  # both names mean FSDP2 here
PRECISION_DTYPES = {"bf16-mixed": torch.bfloat16, "bf16-true": torch.bfloat16}
FSDP_PRECISIONS = ("32-true", "32", "bf16-mixed", "bf16-true")  # Lightning's ModelParallelStrategy refuses 16-mixed


def mixed_precision(precision: str) -> MixedPrecisionPolicy:
    """``trainer.precision`` -> FSDP2's policy: bf16 parameters in compute and fp32 gradient reduction for the bf16
    settings (the shards AdamW updates stay in the module's dtype: fp32 under ``bf16-mixed``); fp32 throughout for
    ``32-true``."""
    dtype = PRECISION_DTYPES.get(precision)
    if dtype is None:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


def shard(model: VisionLanguageModel, mesh: DeviceMesh, policy: MixedPrecisionPolicy) -> None:
    """``fully_shard`` every unit of ``model`` in place, innermost first (module docstring).

    Input embeddings tied to the LM head (Gemma, small Llama/Qwen) share one weight, so they form one unit together.
    """
    embed, head = model.backbone.get_input_embeddings(), model.backbone.get_output_embeddings()
    tied = head is not None and head.weight is embed.weight
    units: list[nn.Module | list[nn.Module]] = [*model.encoder.blocks(), *decoder_layers(model.backbone)]
    units += model.visual.policy.llm_modules()  # called from decoder-layer hooks, after the visual unit resharded
    units += [[embed, head] if tied else embed, model.encoder, model.projector, model.visual, model.backbone, model]
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    register_fsdp_forward_method(model.encoder, "forward_with_cls_attention")
    register_fsdp_forward_method(model, "embed")


def shard_and_load(
    model: VisionLanguageModel,
    build_full: Callable[[], nn.Module],
    rank: int,
    world: int,
    device: torch.device,
    precision: str,
) -> None:
    """Steps 1 and 2 of the module docstring on every rank: shard the meta ``model`` over all ``world`` ranks, then
    fill it from ``build_full()``, which only rank 0 calls."""
    mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("shard",))
    shard(model, mesh, mixed_precision(precision))
    load_from_rank0(model, build_full() if rank == 0 else None, device)


def load_from_rank0(model: nn.Module, full: nn.Module | None, device: torch.device) -> None:
    """Give the sharded meta ``model`` real storage on ``device`` and the weights of ``full`` (rank 0's built
    model; None on the other ranks): parameters and persistent buffers through a broadcasting full state dict,
    the other buffers (e.g. rotary frequencies) by broadcast."""
    model.to_empty(device=device)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=True)
    set_model_state_dict(model, full.state_dict() if full is not None else {}, options=options)
    persistent = set(model.state_dict())
    source = dict(full.named_buffers()) if full is not None else {}
    for name, buffer in model.named_buffers():
        if name in persistent:
            continue
        if full is not None:
            buffer.copy_(source[name])
        dist.broadcast(buffer, src=0)
