"""``python -m skipvision generate``: one request from the command line, or a JSONL of requests in batches.

    python -m skipvision generate --checkpoint runs/shapes-tiny --image circle.png --prompt "What colour?" --stats
    python -m skipvision generate --checkpoint runs/shapes-tiny --requests in.jsonl --output out.jsonl

A JSONL request is ``{"prompt": ..., "image": PATH or null, ...}`` (a relative image path is relative to the JSONL
file); every other key is copied to the answer line, which adds ``text``, ``finish_reason`` and ``stats``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from skipvision.errors import MissingFileError

if TYPE_CHECKING:  # the parser is built without torch (docs/cli.md "Startup"); the run imports it
    from skipvision.inference.generate import Generation
    from skipvision.inference.generator import Request

DTYPES = ("float32", "bfloat16", "float16")  # torch dtype names


def positive(text: str) -> int:
    """A command-line count of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_parser(sub: argparse._SubParsersAction) -> None:
    gen = sub.add_parser("generate", help="answer prompts about images with a trained checkpoint")
    gen.add_argument(
        "--checkpoint", required=True, help="run folder, its checkpoints/ folder, a .ckpt, or an HF LLaVA folder"
    )
    gen.add_argument(
        "--policy",
        help="HF LLaVA folders only: a training-free skip policy spec in YAML, e.g. '{name: fastv, layer: 2}' "
        "(default: the full model)",
    )
    one = gen.add_argument_group("one request")
    one.add_argument("--prompt", help="the user message (<image> marks the image; prepended when absent)")
    one.add_argument("--image", help="image file (omit for a text-only prompt)")
    many = gen.add_argument_group("batch mode")
    many.add_argument("--requests", help="JSONL file of requests")
    many.add_argument("--output", help="JSONL file to write the answers to (default: stdout)")
    many.add_argument("--batch-size", type=positive, default=8)
    gen.add_argument("--max-new-tokens", type=positive, default=32)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-k", type=int)
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--no-drop-kv", action="store_true", help="keep the skipped tokens' K/V after prefill")
    gen.add_argument("--stats", action="store_true", help="print time to first token, ms/token and KV-cache bytes")
    gen.add_argument("--device", default="cpu")
    gen.add_argument("--dtype", choices=DTYPES, default="float32")


def read_requests(path: Path) -> list[tuple[dict, Request]]:
    """Every line of a JSONL request file, checked before anything runs; errors name the line."""
    from skipvision.inference.generator import Request, RequestError

    if not path.is_file():
        raise MissingFileError(f"no requests file at {path}")
    requests = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise RequestError(f"{path}:{number}: not valid JSON ({err.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise RequestError(f'{path}:{number}: a request needs a string "prompt"')
        image = row.get("image")
        if image is not None:
            image = Path(image) if Path(image).is_absolute() else path.parent / image
        requests.append((row, Request(row["prompt"], image)))
    return requests


def format_stats(gen: Generation) -> str:
    s = gen.stats
    decode = "n/a" if s.ms_per_token is None else f"{s.ms_per_token:.2f} ms/token"
    share = s.kv_bytes_kept / s.kv_bytes_prefill if s.kv_bytes_prefill else 1.0
    return (
        f"prompt {s.prompt_tokens} tokens | generated {s.generated_tokens} ({s.finish_reason}) | "
        f"time to first token {s.ttft_ms:.1f} ms | decode {decode} | "
        f"KV cache {s.kv_bytes_prefill:,} B after prefill -> {s.kv_bytes_kept:,} B after removal ({share:.1%})"
    )


def policy_spec(text: str) -> Any:
    """``--policy``: a registered name or a YAML spec (``{name: fastv, layer: 2}``)."""
    from skipvision.inference.generator import RequestError

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise RequestError(f"--policy is not valid YAML: {' '.join(str(err).split())}") from None


def run_generate(args: argparse.Namespace) -> None:
    import torch

    from skipvision.inference.generator import Request, RequestError, VLMGenerator
    from skipvision.inference.sampling import GenerationConfig

    if (args.requests is None) == (args.prompt is None):
        raise RequestError("give either --prompt (with an optional --image) or --requests FILE")
    if args.requests is None and args.output is not None:
        raise RequestError("--output goes with --requests")
    try:
        config = GenerationConfig(
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            stop=tuple(args.stop),
            drop_kv=not args.no_drop_kv,
        )
    except ValueError as err:
        raise RequestError(str(err)) from None
    rows = [({}, Request(args.prompt, args.image))] if args.requests is None else read_requests(Path(args.requests))
    skip = None if args.policy is None else {"policy": policy_spec(args.policy)}
    generator = VLMGenerator.from_checkpoint(args.checkpoint, args.device, getattr(torch, args.dtype), skip)
    results = generator.generate([req for _, req in rows], config, args.batch_size)
    if args.requests is None:
        print(results[0].text)
        if args.stats:
            print(format_stats(results[0]))
        return
    lines = [
        json.dumps({**row, "text": gen.text, "finish_reason": gen.stats.finish_reason, "stats": asdict(gen.stats)})
        for (row, _), gen in zip(rows, results, strict=True)
    ]
    if args.output is None:
        print("\n".join(lines))
    else:
        Path(args.output).write_text("\n".join(lines) + "\n")
    if args.stats:  # to stderr, so stdout stays valid JSONL
        for number, gen in enumerate(results):
            print(f"request {number}: {format_stats(gen)}", file=sys.stderr)
