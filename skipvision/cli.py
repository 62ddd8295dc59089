"""``python -m skipvision <command>``: thin argument parsing over the library (docs/cli.md).

Commands: fit, validate, slurm, generate, eval, bench, data, list, print-recipe, flops. Each command imports what it
needs when it runs, so ``--help`` and ``list`` answer without loading torch (scripts/bench_cli_startup.py measures it).
Errors a user can cause (:class:`~skipvision.errors.SkipvisionError`: bad recipe keys, unknown registry names, missing
files, bad data or requests) print one line and exit with status 2; anything else is a bug and keeps its traceback
(docs/cli.md "Errors").
"""

from __future__ import annotations

import argparse
import sys

from skipvision.bench import cli as bench_cli
from skipvision.data import llava as llava_cli
from skipvision.errors import SkipvisionError
from skipvision.eval import cli as eval_cli
from skipvision.inference import cli as generate_cli
from skipvision.launch import cli as slurm_cli
from skipvision.registry import REGISTRIES


def _add_recipe_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", required=True, help="recipe YAML path, or a shipped recipe's name (see list)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. trainer.max_steps=10")


def _count(text: str) -> int:
    """A non-negative int command-line value."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="skipvision", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    _add_recipe_args(sub.add_parser("fit", help="train a model from a recipe"))
    val = sub.add_parser("validate", help="validation loss and answer accuracy of a checkpoint")
    _add_recipe_args(val)
    val.add_argument("--checkpoint", required=True, help="a .ckpt file written by fit")
    slurm_cli.add_parser(sub)
    generate_cli.add_parser(sub)
    eval_cli.add_parser(sub)
    bench_cli.add_parser(sub)
    _add_recipe_args(sub.add_parser("print-recipe", help="print the resolved recipe"))
    exp = sub.add_parser("export", help="a run's model as a self-contained folder (no Lightning, no base folders)")
    exp.add_argument("--checkpoint", required=True, help="a run folder, a .ckpt file or an FSDP .ckpt folder")
    exp.add_argument("--out", required=True, help="a new or empty folder")
    exp.add_argument("--max-shard-size", default="5GB", help="safetensors shards above this size (e.g. 5GB, 500MB)")
    exp.add_argument(
        "--format",
        default="skipvision",
        choices=("skipvision", "llava-hf"),
        help="llava-hf: transformers' LlavaForConditionalGeneration layout (models without skipping)",
    )
    merge = sub.add_parser("consolidate", help="a checkpoint's model weights (FSDP shards too) as one safetensors")
    merge.add_argument("--checkpoint", required=True, help="a run folder, a .ckpt file or an FSDP .ckpt folder")
    merge.add_argument("--out", required=True, help="the .safetensors file to write")

    flops = sub.add_parser("flops", help="LLM prefill FLOPs of the paper's settings, full model vs Skip-Vision")
    flops.add_argument("--text-tokens", type=_count, default=40, help="prompt text tokens per sample besides the image")
    flops.add_argument("--causal", action="store_true", help="count only the causal half of the attention scores")

    lst = sub.add_parser("list", help="registered components and presets")
    lst.add_argument("kind", nargs="?", choices=sorted(REGISTRIES), help="only this kind")

    data = sub.add_parser("data", help="dataset tools")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    # Flags left out are absent from the namespace (SUPPRESS): generate_shapes fills them from ShapesSettings.
    shapes = data_sub.add_parser(
        "shapes",
        help="generate the synthetic shapes VQA set as WebDataset shards",
        description="Flags not given take the defaults of a recipe's data.shapes section.",
        argument_default=argparse.SUPPRESS,
    )
    shapes.add_argument("--out", required=True)
    shapes.add_argument("--num-train", type=int)
    shapes.add_argument("--num-val", type=int)
    shapes.add_argument("--seed", type=int)
    shapes.add_argument("--image-size", type=int)
    shapes.add_argument("--shard-size", type=int)
    shapes.add_argument("--vocab-size", type=int)
    shapes.add_argument("--train-questions", type=int, help="question turns per training image")
    shapes.add_argument("--train-describe", action="store_true", help="add a caption turn to training images")
    shapes.add_argument("--overwrite", action="store_true")
    llava_cli.add_parser(data_sub)
    return parser


def list_text(kind: str | None) -> str:
    """Every component of ``kind`` (all kinds when None) with its description and presets, then (for all kinds)
    the shipped recipes. Built-ins come from the registries' catalogues, so nothing imports torch unless a plugin
    does."""
    from skipvision.registry import load_entry_point_plugins, preset_names
    from skipvision.resources import shipped_recipes

    load_entry_point_plugins()
    blocks = []
    for name, registry in REGISTRIES.items():
        if kind not in (None, name):
            continue
        listing = registry.listing()
        width = max((len(n) for n, _ in listing), default=0)
        lines = [name, *(f"  {n:<{width}}  {description}".rstrip() for n, description in listing)]
        lines.append(f"  presets: {', '.join(preset_names(name)) or '(none)'}")
        blocks.append("\n".join(lines))
    if kind is None:
        blocks.append(f"recipes: {', '.join(sorted(shipped_recipes()))}")
    return "\n\n".join(blocks)


def run(args: argparse.Namespace) -> None:
    if args.command == "list":
        print(list_text(args.kind))
    elif args.command == "bench":
        bench_cli.run(args)
    elif args.command == "generate":
        generate_cli.run_generate(args)
    elif args.command == "eval":
        eval_cli.run_eval_command(args)
    elif args.command == "slurm":
        slurm_cli.run_slurm(args)
    elif args.command == "print-recipe":
        from skipvision.recipe import load_recipe, to_yaml

        print(to_yaml(load_recipe(args.recipe, args.overrides)), end="")
    elif args.command == "export":
        from skipvision.inference.export import export

        print(f"wrote {export(args.checkpoint, args.out, args.max_shard_size, args.format)}")
    elif args.command == "consolidate":
        from skipvision.inference.checkpoint import consolidate

        print(f"wrote {consolidate(args.checkpoint, args.out)} tensors to {args.out}")
    elif args.command == "flops":
        from rich.console import Console

        from skipvision.paper import flops_table, paper_flops

        Console().print(flops_table(paper_flops(args.text_tokens, causal=args.causal)))
    elif args.command == "data" and args.data_command == "llava":
        llava_cli.run(args)
    elif args.command == "data":
        from skipvision.data.shapes import generate_shapes

        settings = {k: v for k, v in vars(args).items() if k not in ("command", "data_command", "out")}
        meta = generate_shapes(args.out, **settings)
        print(
            f"wrote {meta['num_train']} train / {meta['num_val']} val samples in "
            f"{len(meta['train_shards']) + len(meta['val_shards'])} shards, and a tokenizer, to {args.out}"
        )
    else:
        from skipvision.lit import run as jobs
        from skipvision.recipe import load_recipe

        cfg = load_recipe(args.recipe, args.overrides)
        if args.command == "fit":
            jobs.fit(cfg)
        else:
            jobs.validate(cfg, args.checkpoint)


def user_message(err: SkipvisionError) -> str:
    """The error's own message; one re-raised from a DataLoader worker carries the worker's traceback too
    ("Caught DataError in DataLoader worker process 0. Original Traceback ..."), of which only its last line is ours."""
    text = str(err)
    if text.startswith("Caught ") and "Original Traceback" in text:
        last = text.rstrip().splitlines()[-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return text


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status (2 for a user error, printed as one line)."""
    args = make_parser().parse_args(argv)
    try:
        run(args)
    except SkipvisionError as err:
        message = " ".join(user_message(err).split())  # one line, even for messages quoting multi-line text
        print(f"skipvision {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0
