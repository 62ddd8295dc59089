"""Training memory per rank of the paper's LLaVA setting (LLaMA3-8B + CLIP ViT-L/14-336), full model and Skip-Vision,
under DDP and FSDP; computed on the meta device (skipvision/bench/memory.py, docs/distributed.md "Memory per rank").

    bash scripts/venv-run python scripts/memory_per_rank.py [--ranks 8] [--batch 16] [--text-tokens 128]
"""

from __future__ import annotations

import argparse

from skipvision.bench.memory import MemoryReport, memory_per_rank
from skipvision.lit.module import COMPONENTS
from skipvision.paper import build_meta_model, get_setting
from skipvision.recipe import load_recipe

GIB = 2**30


def report(skip: bool, ranks: int, batch: int, text_tokens: int) -> MemoryReport:
    setting = get_setting("llava")
    overrides = list(setting.meta_overrides) + ([] if skip else ["model.skip.policy=none"])
    cfg = load_recipe(setting.recipe, overrides)
    model = build_meta_model(setting.recipe, overrides)
    prefixes = {"encoder": "encoder.", "projector": "projector.", "llm": "backbone."}
    frozen = tuple(prefixes[part] for part in COMPONENTS if cfg.optim[f"freeze_{part}"])
    title = f"{'Skip-Vision' if skip else 'full model'}, {model.num_image_tokens} image slots"
    return memory_per_rank(model, lambda name: not name.startswith(frozen), title, ranks, batch, text_tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16, help="samples per rank (paper-llava: 16 x 8 GPUs)")
    parser.add_argument("--text-tokens", type=int, default=128, help="text tokens per sample besides the image")
    args = parser.parse_args()
    print(f"GiB per rank, bf16-mixed, AdamW, {args.batch} samples per rank of 1 image + {args.text_tokens} text tokens")
    print("| model | strategy | params | grads | AdamW | activations | total | with act. ckpt: act. | total |")
    print("|---|---|---|---|---|---|---|---|---|")
    for skip in (False, True):
        r = report(skip, args.ranks, args.batch, args.text_tokens)
        for row in r.rows:
            cells = [row.params, row.grads, row.optimizer, row.activations, row.total(False)]
            cells += [row.activations_checkpointed, row.total(True)]
            print(
                f"| {r.title} ({r.tokens} tokens, {r.ffn_tokens} through the FFN) | {row.strategy} | "
                + " | ".join(f"{c / GIB:.1f}" for c in cells)
                + " |"
            )
    print(f"parameters: {r.trainable / 1e9:.3f} B trainable, {r.frozen / 1e9:.3f} B frozen (the vision tower)")


if __name__ == "__main__":
    main()
