"""``python -m skipvision eval``: a model's answers on an eval set, scored with the benchmark's metric.

    python -m skipvision eval --checkpoint runs/shapes-tiny --data data/shapes --task exact --out eval/shapes
    python -m skipvision eval --checkpoint llava-1.5-7b-hf --data pope.jsonl --task yesno --out eval/pope \
        --compare full='{name: none}' fastv='{name: fastv, layer: 2}'

Everything a user can get wrong (the task, the --compare entries, the eval set, the output folder) is checked
before a model loads. The parser is built without torch (docs/cli.md "Startup"); the run imports it.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from skipvision.errors import MissingFileError, SkipvisionError
from skipvision.eval.scoring import MAX_NEW_TOKENS, TASKS
from skipvision.inference.cli import DTYPES, policy_spec, positive

if TYPE_CHECKING:
    from skipvision.eval.runner import ModelSpec

_NAME = re.compile(r"[\w.+-]+")


class EvalArgumentError(SkipvisionError, ValueError):
    """Command-line arguments of ``eval`` that cannot work together: a task, a --compare entry, --policy."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser(
        "eval",
        help="score a model's answers on an eval set (VQA, multiple choice, yes/no, exact, captions)",
        description="Greedy answers through the KV-removal loop, scored with the benchmark's metric, per category "
        "(docs/evaluation.md).",
    )
    ev.add_argument(
        "--checkpoint",
        help="run folder, checkpoints/ folder, .ckpt, export folder or HF LLaVA folder (with --compare: the model "
        "that policy entries run on)",
    )
    ev.add_argument("--data", required=True, help="JSONL file, converted data folder (its val/*.tar), or shards")
    ev.add_argument("--task", required=True, help=f"one of: {', '.join(TASKS)}")
    ev.add_argument("--out", required=True, help="folder for predictions.jsonl, metrics.json and metrics.md")
    ev.add_argument("--overwrite", action="store_true", help="replace those three files in a folder that has files")
    ev.add_argument(
        "--compare",
        nargs="+",
        metavar="NAME=MODEL",
        help="models side by side, one column each: NAME=PATH (any --checkpoint form), or NAME='{name: POLICY, "
        "...}' to run a training-free skip policy on --checkpoint (an HF LLaVA folder)",
    )
    ev.add_argument("--policy", help="HF LLaVA folders only: a training-free skip policy spec, e.g. '{name: fastv}'")
    ev.add_argument("--instruction", help="text added on a new line after every question")
    ev.add_argument("--batch-size", type=positive, default=8)
    ev.add_argument("--max-new-tokens", type=positive, help="default: 64 for caption, 16 for the other tasks")
    ev.add_argument("--limit", type=positive, help="only the first N items")
    ev.add_argument("--no-drop-kv", action="store_true", help="keep the skipped tokens' K/V after prefill")
    ev.add_argument("--no-progress", action="store_true", help="no progress bar")
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--dtype", choices=DTYPES, default="float32")


def model_specs(checkpoint: str | None, compare: list[str] | None, policy: str | None) -> list[ModelSpec]:
    """The models to evaluate: --checkpoint (with --policy) alone, or the --compare entries in order."""
    from skipvision.eval.runner import ModelSpec

    if not compare:
        if checkpoint is None:
            raise EvalArgumentError("give --checkpoint, or --compare NAME=MODEL ...")
        spec = None if policy is None else policy_spec(policy)
        return [ModelSpec(Path(checkpoint).name or checkpoint, checkpoint, spec)]
    if policy is not None:
        raise EvalArgumentError("--policy goes with one model; with --compare, give policies as NAME='{name: ...}'")
    specs: list[ModelSpec] = []
    for entry in compare:
        name, sep, value = entry.partition("=")
        if not sep or not _NAME.fullmatch(name) or not value:
            raise EvalArgumentError(
                f"--compare {entry!r}: expected NAME=PATH or NAME='{{name: POLICY, ...}}' (NAME: letters, digits, "
                "_ . + -)"
            )
        if any(s.name == name for s in specs):
            raise EvalArgumentError(f"--compare: the name {name!r} is given twice")
        if value.lstrip().startswith("{"):
            if checkpoint is None:
                raise EvalArgumentError(f"--compare {name}: a policy entry runs on --checkpoint; give --checkpoint")
            specs.append(ModelSpec(name, checkpoint, _policy_mapping(name, value)))
        else:
            specs.append(ModelSpec(name, value))
    if checkpoint is not None and all(s.policy is None for s in specs):
        raise EvalArgumentError(
            "--checkpoint with --compare is the model that policy entries run on, and no entry is a policy; add it "
            "as an entry (NAME=PATH) instead"
        )
    return specs


def _policy_mapping(name: str, value: str) -> dict[str, Any]:
    try:
        spec = yaml.safe_load(value)
    except yaml.YAMLError as err:
        raise EvalArgumentError(f"--compare {name}: not valid YAML ({' '.join(str(err).split())})") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise EvalArgumentError(f"--compare {name}: a policy is a mapping with a name: '{{name: fastv, layer: 2}}'")
    return spec


def check_models(specs: list[ModelSpec]) -> None:
    """Every checkpoint path exists, and every policy is registered and runs on an HF LLaVA folder."""
    from skipvision.registry import REGISTRIES, load_entry_point_plugins, resolve_spec
    from skipvision.weights.llava import llava_config

    for spec in specs:
        if not Path(spec.checkpoint).exists():
            raise MissingFileError(f"model {spec.name}: no checkpoint at {spec.checkpoint}")
        if spec.policy is None:
            continue
        if llava_config(spec.checkpoint) is None:
            raise EvalArgumentError(
                f"model {spec.name}: a skip policy runs on an HF LLaVA folder; {spec.checkpoint} is not one "
                "(a training run or an export has its own skip settings)"
            )
        load_entry_point_plugins()
        policies = REGISTRIES["skip_policy"]
        policies.get(resolve_spec(policies, spec.policy)["name"])


def run_eval_command(args: argparse.Namespace) -> None:
    import torch

    from skipvision.eval.data import read_eval_set
    from skipvision.eval.report import OUTPUT_FILES, check_out, write_outputs
    from skipvision.eval.runner import run_eval

    if args.task not in TASKS:
        raise EvalArgumentError(f"unknown task {args.task!r}; tasks: {', '.join(TASKS)}")
    out = Path(args.out)
    check_out(out, args.overwrite)
    specs = model_specs(args.checkpoint, args.compare, args.policy)
    check_models(specs)
    items = read_eval_set(args.data, args.task, args.limit)
    dtype = getattr(torch, args.dtype)
    results = run_eval(
        specs,
        items,
        args.task,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        instruction=args.instruction,
        drop_kv=not args.no_drop_kv,
        device=args.device,
        dtype=dtype,
        progress=not args.no_progress,
    )
    settings = {
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens or MAX_NEW_TOKENS[args.task],
        "instruction": args.instruction,
        "drop_kv": not args.no_drop_kv,
        "device": args.device,
        "dtype": args.dtype,
        "limit": args.limit,
    }
    table = write_outputs(out, args.task, str(args.data), items, results, settings)
    for result in results:
        speed = f"{result.samples_per_s:.2f} samples/s"
        print(f"{result.model.name}: {len(items)} samples in {result.seconds:.1f} s ({speed})", file=sys.stderr)
    print(f"wrote {', '.join(str(out / name) for name in OUTPUT_FILES)}", file=sys.stderr, flush=True)
    print(table, end="")
