"""``python -m skipvision <command>``: thin argument parsing over the library (ARCHITECTURE.md layout).

Commands: fit, validate, generate, bench, data, list, print-recipe, flops. Expected failures (bad recipe keys, unknown
registry names, missing files, bad data or requests) print one clear line and exit with status 2, without a
traceback.
"""

from __future__ import annotations

import argparse
import sys

from rich.console import Console
from rich.table import Table

from skipvision.bench import cli as bench_cli
from skipvision.data.chat import ConversationError
from skipvision.data.pipeline import DataError
from skipvision.inference import cli as generate_cli
from skipvision.inference.generator import RequestError
from skipvision.model import ImageTokenMismatchError
from skipvision.recipe import RecipeError, load_recipe, to_yaml
from skipvision.registry import REGISTRIES, RegistryError, load_entry_point_plugins, preset_names

USER_ERRORS = (
    RecipeError,
    RegistryError,
    DataError,
    ConversationError,
    ImageTokenMismatchError,
    RequestError,
    FileNotFoundError,
    FileExistsError,
)


def _add_recipe_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", required=True, help="recipe YAML path, or a name under recipes/")
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
    generate_cli.add_parser(sub)
    bench_cli.add_parser(sub)
    _add_recipe_args(sub.add_parser("print-recipe", help="print the resolved recipe"))

    flops = sub.add_parser("flops", help="LLM prefill FLOPs of the paper's settings, full model vs Skip-Vision")
    flops.add_argument("--text-tokens", type=_count, default=40, help="prompt text tokens per sample besides the image")
    flops.add_argument("--causal", action="store_true", help="count only the causal half of the attention scores")

    lst = sub.add_parser("list", help="registered components and presets")
    lst.add_argument("kind", nargs="?", choices=sorted(REGISTRIES), help="only this kind")

    data = sub.add_parser("data", help="dataset tools")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    shapes = data_sub.add_parser("shapes", help="generate the synthetic shapes VQA set as WebDataset shards")
    shapes.add_argument("--out", required=True)
    shapes.add_argument("--num-train", type=int, default=20000)
    shapes.add_argument("--num-val", type=int, default=1000)
    shapes.add_argument("--seed", type=int, default=0)
    shapes.add_argument("--image-size", type=int, default=64)
    shapes.add_argument("--shard-size", type=int, default=1000)
    shapes.add_argument("--vocab-size", type=int, default=512)
    shapes.add_argument("--train-questions", type=int, default=1, help="question turns per training image")
    shapes.add_argument("--train-describe", action="store_true", help="add a caption turn to training images")
    shapes.add_argument("--overwrite", action="store_true")
    return parser


def cmd_list(kind: str | None, console: Console) -> None:
    load_entry_point_plugins()
    for name, registry in REGISTRIES.items():
        if kind not in (None, name):
            continue
        table = Table(title=f"{name}s", title_justify="left")
        table.add_column("name")
        table.add_column("description")
        for entry in registry.entries():
            table.add_row(entry.name, entry.description)
        console.print(table)
        presets = preset_names(name)
        console.print(f"  presets (registry/{name}/): {', '.join(presets) or '(none)'}\n")


def run(args: argparse.Namespace, console: Console) -> None:
    if args.command == "list":
        cmd_list(args.kind, console)
    elif args.command == "bench":
        bench_cli.run(args)
    elif args.command == "generate":
        generate_cli.run_generate(args)
    elif args.command == "print-recipe":
        print(to_yaml(load_recipe(args.recipe, args.overrides)), end="")
    elif args.command == "flops":
        from skipvision.paper import flops_table, paper_flops

        console.print(flops_table(paper_flops(args.text_tokens, causal=args.causal)))
    elif args.command == "data":
        from skipvision.data.shapes import generate_shapes

        settings = {k: v for k, v in vars(args).items() if k not in ("command", "data_command", "out")}
        meta = generate_shapes(args.out, **settings)
        console.print(
            f"wrote {meta['num_train']} train / {meta['num_val']} val samples in "
            f"{len(meta['train_shards']) + len(meta['val_shards'])} shards, and a tokenizer, to {args.out}"
        )
    else:
        from skipvision.lit import run as jobs

        cfg = load_recipe(args.recipe, args.overrides)
        if args.command == "fit":
            jobs.fit(cfg)
        else:
            jobs.validate(cfg, args.checkpoint)


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    console = Console()
    try:
        run(args, console)
    except USER_ERRORS as err:
        print(f"skipvision {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0
