"""Training memory per rank of a full-size setting under DDP and FSDP, computed on the meta device
(docs/distributed.md "Memory per rank").

Nothing is allocated: the model is built on the meta device (skipvision/paper.py) and every number is either a count
(parameters, gradients and AdamW states from the real parameter shapes, trainable or frozen) or the sum of the tensors
autograd saves for backward, recorded with ``saved_tensors_hooks`` while one decoder layer and the LM head + loss run
on meta tensors of the real shapes, in bf16 as under ``bf16-mixed``. The attention core is counted as a fused
(flash) kernel keeps it, q, k, v, output and an fp32 log-sum-exp per query, instead of running the meta device's
math kernel, whose [T, T] probabilities no GPU run would keep. A Skip-Vision layer is the full layer minus the MLP's
share on the skipped rows. Not counted: the vision encoder (frozen in the paper's SFT, so autograd saves nothing in
it), the projector and summary tokens (a few MB), DDP's gradient buckets (a second copy of the gradients), FSDP's
gathered layers, kernels' workspaces and fragmentation. The layer and head are run the way a Llama-style
transformers model holds them (``model.rotary_emb``, ``model.norm``): the paper's backbones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedModel

from skipvision.adapters import decoder_layers
from skipvision.model import VisionLanguageModel, next_token_loss

BF16, FP32 = 2, 4
COUNTING_ATTENTION = "skipvision_counting"


def saved_bytes(run: Callable[[], object], skip: set[int]) -> int:
    """Bytes of the tensors autograd saves while ``run()`` runs, each storage once; tensors whose base is in ``skip``
    (ids of parameters) are weights, counted elsewhere."""
    saved: dict[int, torch.Tensor] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        base = t._base if t._base is not None else t
        if id(base) not in skip:
            saved[id(base)] = base
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(t.numel() * t.element_size() for t in saved.values())


def _counting_attention(
    module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: object, **kwargs: object
) -> tuple[torch.Tensor, None]:
    """An attention of the right output shape that saves nothing; :func:`fused_attention_bytes` adds what a fused
    kernel keeps."""
    out = query.detach().transpose(1, 2).contiguous()  # [B, T, H, d]
    return out.requires_grad_(query.requires_grad), None


AttentionInterface.register(COUNTING_ATTENTION, _counting_attention)


def fused_attention_bytes(config: object, batch: int, tokens: int) -> int:
    """What a fused attention kernel keeps for backward: q, k, v and the output in bf16, an fp32 log-sum-exp."""
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return batch * tokens * head_dim * (2 * heads + 2 * kv_heads) * BF16 + batch * heads * tokens * FP32


def layer_activation_bytes(backbone: PreTrainedModel, batch: int, tokens: int, ffn_tokens: int) -> int:
    """Saved activations of one decoder layer: ``tokens`` in attention, ``ffn_tokens`` of them through the MLP."""
    layer = decoder_layers(backbone)[0]
    params = {id(p) for p in backbone.parameters()}
    config = backbone.config
    dim = config.hidden_size

    def run_layer(rows: int) -> int:
        x = torch.randn(batch, rows, dim, device="meta", dtype=torch.bfloat16, requires_grad=True)
        pos = torch.arange(rows, device="meta")[None].expand(batch, rows)
        rotary = backbone.model.rotary_emb(x, pos)
        return saved_bytes(lambda: layer(x, attention_mask=None, position_ids=pos, position_embeddings=rotary), params)

    def run_mlp(rows: int) -> int:
        x = torch.randn(batch, rows, dim, device="meta", dtype=torch.bfloat16, requires_grad=True)
        return saved_bytes(lambda: layer.mlp(x), params)

    previous = config._attn_implementation
    config._attn_implementation = COUNTING_ATTENTION
    try:
        full = run_layer(tokens) + fused_attention_bytes(config, batch, tokens)
        return full - run_mlp(tokens) + run_mlp(ffn_tokens)
    finally:
        config._attn_implementation = previous


def head_activation_bytes(backbone: PreTrainedModel, batch: int, tokens: int) -> int:
    """Saved activations of the final norm, the LM head and the loss (fp32 logits for the cross-entropy)."""
    params = {id(p) for p in backbone.parameters()}
    x = torch.randn(batch, tokens, backbone.config.hidden_size, device="meta", dtype=torch.bfloat16, requires_grad=True)
    labels = torch.zeros(batch, tokens, dtype=torch.long, device="meta")
    head = backbone.get_output_embeddings()
    return saved_bytes(lambda: next_token_loss(head(backbone.model.norm(x)), labels), params)


@dataclass
class MemoryRow:
    """Bytes per rank of one strategy: parameters (fp32 masters), gradients, AdamW states, activations."""

    strategy: str
    params: int
    grads: int
    optimizer: int
    activations: int
    activations_checkpointed: int

    def total(self, checkpointed: bool) -> int:
        acts = self.activations_checkpointed if checkpointed else self.activations
        return self.params + self.grads + self.optimizer + acts


@dataclass
class MemoryReport:
    title: str
    trainable: int
    frozen: int
    batch: int
    tokens: int
    ffn_tokens: int
    rows: list[MemoryRow]


def memory_per_rank(
    model: VisionLanguageModel,
    trainable: Callable[[str], bool],
    title: str,
    ranks: int,
    batch: int,
    text_tokens: int,
) -> MemoryReport:
    """DDP and FSDP over ``ranks`` ranks for ``batch`` samples per rank of one image and ``text_tokens`` text tokens
    each. ``trainable(name)`` says whether a parameter trains (the recipe's freeze flags)."""
    counts = {True: 0, False: 0}
    for name, p in model.named_parameters():
        counts[trainable(name)] += p.numel()
    total, train = counts[True] + counts[False], counts[True]
    tokens = model.num_image_tokens + text_tokens
    skipped = model.visual.layout.skipped
    backbone = model.backbone.to(torch.bfloat16)
    layers = len(decoder_layers(backbone))
    layer = layer_activation_bytes(backbone, batch, tokens, tokens - skipped)
    head = head_activation_bytes(backbone, batch, tokens)
    # Checkpointed: each layer keeps only its bf16 input; one layer at a time is recomputed during backward.
    checkpointed = layers * batch * tokens * backbone.config.hidden_size * BF16 + layer + head
    acts = layers * layer + head
    rows = [
        MemoryRow("ddp", FP32 * total, FP32 * train, 2 * FP32 * train, acts, checkpointed),
        MemoryRow(
            f"fsdp ({ranks} ranks)",
            FP32 * total // ranks,
            FP32 * train // ranks,
            2 * FP32 * train // ranks,
            acts,
            checkpointed,
        ),
    ]
    return MemoryReport(title, train, counts[False], batch, tokens, tokens - skipped, rows)
