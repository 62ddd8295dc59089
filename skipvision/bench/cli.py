"""``python -m skipvision bench --recipe recipes/bench-llava.yaml [--train-steps N | --checkpoint VARIANT=CKPT ...]``.

Writes ``bench.json``, ``bench.md`` and ``bench.png`` to ``--out`` (default: the recipe's ``output_dir``) and
prints the table.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from skipvision.errors import MissingFileError
from skipvision.recipe import RecipeError, load_recipe


def add_parser(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="measure a recipe's variants side by side (speed, FLOPs, memory, accuracy)")
    bench.add_argument("--recipe", required=True, help="a bench recipe, e.g. recipes/bench-llava.yaml")
    bench.add_argument("overrides", nargs="*", help="key=value overrides, e.g. bench.repeats=3")
    bench.add_argument("--train-steps", type=int, help="train every variant this many steps, then measure accuracy")
    bench.add_argument(
        "--checkpoint", action="append", default=[], metavar="VARIANT=CKPT", help="accuracy from this checkpoint"
    )
    bench.add_argument("--out", help="output folder (default: the recipe's output_dir)")
    bench.add_argument(
        "--profile", action="store_true", help="only profile one training step and one prefill per variant"
    )
    bench.add_argument("--device", default="cpu")


def parse_checkpoints(items: list[str]) -> dict[str, str]:
    pairs = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise RecipeError(f"--checkpoint {item!r} is not of the form VARIANT=PATH")
        if not Path(path).is_file():
            raise MissingFileError(f"--checkpoint {name}: no checkpoint at {path}")
        pairs[name] = path
    return pairs


def command_line(args: argparse.Namespace) -> str:
    """The bench command these arguments stand for (recorded in bench.json, so a table says how it was made)."""
    argv = ["bench", "--recipe", args.recipe]
    if args.train_steps is not None:
        argv += ["--train-steps", str(args.train_steps)]
    for item in args.checkpoint:
        argv += ["--checkpoint", item]
    if args.out:
        argv += ["--out", args.out]
    if args.device != "cpu":
        argv += ["--device", args.device]
    return "python -m skipvision " + shlex.join([*argv, *args.overrides])


def run(args: argparse.Namespace) -> None:
    import torch
    from rich.console import Console
    from rich.markdown import Markdown

    from skipvision.bench import report
    from skipvision.bench.runner import build_variants, profile_variants, run_bench

    cfg = load_recipe(args.recipe, args.overrides)
    out = Path(args.out or cfg.output_dir)
    if args.profile:
        texts = profile_variants(build_variants(cfg), cfg.bench, torch.device(args.device))
        out.mkdir(parents=True, exist_ok=True)
        (out / "profile.txt").write_text("\n".join(texts.values()))
        print("\n".join(texts.values()))
        return
    result = run_bench(cfg, args.train_steps, parse_checkpoints(args.checkpoint), args.device)
    result["command"] = command_line(args)
    files = report.write(result, out)
    console = Console()
    console.print(Markdown(report.markdown(result)))
    overhead = result["hook_overhead"]
    console.print(f"Skip-FFN hooks with a keep-everything plan: {100 * overhead['overhead']:+.1f}% step time")
    console.print("wrote " + ", ".join(str(p) for p in files.values()))
