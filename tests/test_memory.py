"""Memory per rank computed on the meta device (docs/distributed.md "Memory per rank"): the counting itself."""

from __future__ import annotations

import torch
from torch import nn

from skipvision.bench.memory import fused_attention_bytes, layer_activation_bytes, memory_per_rank, saved_bytes
from skipvision.paper import build_meta_model

from .conftest import tiny_lm_config


def test_saved_bytes_counts_what_autograd_keeps_and_leaves_weights_out() -> None:
    linear = nn.Linear(8, 16, device="meta", dtype=torch.bfloat16)
    x = torch.randn(3, 5, 8, device="meta", dtype=torch.bfloat16, requires_grad=True)
    params = {id(p) for p in linear.parameters()}
    assert saved_bytes(lambda: linear(x), params) == 3 * 5 * 8 * 2  # the input; the weight is a parameter
    assert saved_bytes(lambda: torch.relu(linear(x)), params) == 3 * 5 * 8 * 2 + 3 * 5 * 16 * 2  # + relu's output


def test_layer_bytes_grow_with_ffn_rows_only_through_the_mlp() -> None:
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        backbone = AutoModelForCausalLM.from_config(tiny_lm_config()).to(torch.bfloat16)
    cfg = backbone.config
    full = layer_activation_bytes(backbone, 2, 40, 40)
    per_row = (full - layer_activation_bytes(backbone, 2, 40, 30)) / (2 * 10)
    # LlamaMLP keeps its input, gate and up projections, the activation and the product: D + 4F values per row.
    assert per_row == (cfg.hidden_size + 4 * cfg.intermediate_size) * 2
    assert full > fused_attention_bytes(cfg, 2, 40) > 0


def test_per_rank_states_follow_the_parameter_counts() -> None:
    model = build_meta_model("shapes-tiny")
    total = sum(p.numel() for p in model.parameters())
    frozen = sum(p.numel() for p in model.encoder.parameters())
    report = memory_per_rank(
        model, lambda name: not name.startswith("encoder."), "tiny", ranks=4, batch=2, text_tokens=8
    )
    ddp, fsdp = report.rows
    assert (report.trainable, report.frozen) == (total - frozen, frozen)
    assert (ddp.params, ddp.grads, ddp.optimizer) == (4 * total, 4 * (total - frozen), 8 * (total - frozen))
    assert (fsdp.params, fsdp.grads, fsdp.optimizer) == (ddp.params // 4, ddp.grads // 4, ddp.optimizer // 4)
    assert report.tokens - report.ffn_tokens == model.visual.layout.skipped > 0
    assert 0 < ddp.activations_checkpointed < ddp.activations
