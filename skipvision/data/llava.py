"""``skipvision data llava``: LLaVA-Instruct JSON or JSONL and its images -> train/val WebDataset shards that a
recipe's ``data.root`` reads (docs/data.md "Converting LLaVA data").

The conversion has two phases, each spread over ``--workers`` processes, with a progress bar:

1. *Check* every record (skipvision/data/llava_samples.py). The accepted ones are shuffled with ``--seed``; the first
   ``--val-fraction`` of them go to val, the rest to train. This *plan* (which records, in which order, in which
   split, and the rejected ones with their reasons) is saved as ``plan.json`` before any shard is written.
2. *Write* the plan's samples as shards of about ``--shard-bytes`` (skipvision/data/llava_shards.py), then
   ``rejected.jsonl``, then, last, ``meta.json``.

Re-running into a folder whose ``plan.json`` was made from the same input (by content) and settings resumes: the
check is skipped, complete shards are kept, and the output is byte-identical to an uninterrupted run (docs/data.md
"Resume"). An output folder holding anything else is refused unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import random
import shutil
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from skipvision.atomic import PARTIAL, write_text_atomic
from skipvision.data import llava_samples as samples
from skipvision.data.llava_samples import CheckSettings, LlavaInputError, Record, Verdict
from skipvision.data.llava_shards import Workers, write_split
from skipvision.errors import MissingFileError, OutputExistsError

FORMAT, VERSION = "llava", 1
PLAN, META, REJECTED = "plan.json", "meta.json", "rejected.jsonl"
SPLITS = ("train", "val")
BYTE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}  # longest suffix first


@dataclass(frozen=True)
class ConvertSettings:
    """The settings that decide the output (recorded in plan.json and meta.json); ``--workers`` does not."""

    val_fraction: float = 0.01
    seed: int = 0
    shard_bytes: int = 500 * 10**6
    tokenizer: str | None = None
    chat_template: str = "auto"
    max_tokens: int | None = None
    image_tokens: int = 576


class Progress:
    """Where the converter reports progress: a phase of ``total`` records, then one :meth:`advance` per record.
    This base class reports nothing; :class:`ConsoleProgress` draws a bar."""

    def phase(self, name: str, total: int, done: int = 0) -> None:
        """A new phase ``name`` of ``total`` records, ``done`` of them done already (kept shards, on resume)."""

    def advance(self) -> None:
        """One more record of the current phase is done."""


class ConsoleProgress(Progress):
    """A rich progress bar on stderr, one line per phase: records done, elapsed and remaining time."""

    def __init__(self) -> None:
        from rich import progress as bar
        from rich.console import Console

        columns = (bar.BarColumn(), bar.MofNCompleteColumn(), bar.TimeElapsedColumn(), bar.TimeRemainingColumn())
        self.bar = bar.Progress(bar.TextColumn("{task.description:<5}"), *columns, console=Console(stderr=True))
        self.task: Any = None

    def phase(self, name: str, total: int, done: int = 0) -> None:
        if self.task is None:
            self.bar.start()
        self.task = self.bar.add_task(name, total=total, completed=done)

    def advance(self) -> None:
        self.bar.advance(self.task)

    def close(self) -> None:
        """Stop the bar, if a phase started it (a bar stopped without a start still prints a line)."""
        if self.task is not None:
            self.bar.stop()
            self.task = None


@dataclass(frozen=True)
class Summary:
    """What a conversion did: the meta.json it wrote, and how many shards an earlier run had finished."""

    meta: dict[str, Any]
    kept_shards: int


def byte_size(text: str) -> int:
    """``500MB``, ``1.5GB``, ``64KB`` or a plain byte count (decimal units, as HF's shard sizes) -> bytes."""
    number = text.strip().upper()
    unit = next((u for u in BYTE_UNITS if number.endswith(u)), "")
    try:
        value = float(number.removesuffix(unit)) * BYTE_UNITS.get(unit, 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 500MB, 2GB or 1000000") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 byte, got {text!r}")
    return int(value)


def add_parser(data_sub: argparse._SubParsersAction) -> None:
    """``data llava`` and its flags (built without torch: docs/cli.md "Startup")."""
    llava = data_sub.add_parser(
        "llava",
        help="convert LLaVA-Instruct JSON/JSONL and its images to train/val WebDataset shards",
        description="Rejected records are listed in OUT/rejected.jsonl with their reasons; running again resumes "
        "an interrupted conversion (docs/data.md).",
    )
    llava.add_argument("--json", required=True, help="LLaVA-Instruct JSON (a list of records), or .jsonl")
    llava.add_argument("--images", required=True, help="the folder the records' image paths are relative to")
    llava.add_argument("--out", required=True, help="output folder: train/*.tar, val/*.tar, meta.json")
    defaults = ConvertSettings()
    llava.add_argument(
        "--val-fraction",
        type=float,
        default=defaults.val_fraction,
        help="share of the accepted samples for val (default %(default)s)",
    )
    llava.add_argument("--seed", type=int, default=defaults.seed, help="sample order and train/val split")
    llava.add_argument(
        "--shard-bytes",
        type=byte_size,
        default=defaults.shard_bytes,
        help="shard size, e.g. 500MB, 2GB (default %(default)s bytes)",
    )
    llava.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="processes reading the images (default: all CPUs)"
    )
    llava.add_argument("--tokenizer", help="a tokenizer folder: store each sample's num_tokens")
    llava.add_argument(
        "--chat-template", default=defaults.chat_template, help="as data.chat_template (with --tokenizer)"
    )
    llava.add_argument("--max-tokens", type=int, help="reject samples with more tokens (needs --tokenizer)")
    llava.add_argument(
        "--image-tokens", type=int, default=defaults.image_tokens, help="tokens counted per image (default %(default)s)"
    )
    llava.add_argument("--overwrite", action="store_true", help="replace an output folder that holds other data")


def run(args: argparse.Namespace) -> None:
    """Convert with a progress bar, then print the summary line."""
    settings = ConvertSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ConvertSettings)})
    progress = ConsoleProgress()
    try:
        with contextlib.closing(progress):  # the bar stops before any message, which it would draw over
            summary = convert_llava(
                args.json,
                args.images,
                args.out,
                settings,
                workers=args.workers,
                overwrite=args.overwrite,
                progress=progress,
            )
    except KeyboardInterrupt:
        print("interrupted; the same command resumes where this one stopped (docs/data.md)", file=sys.stderr)
        raise SystemExit(130) from None
    print(summary_line(summary, Path(args.out)))


def summary_line(summary: Summary, out: Path) -> str:
    meta = summary.meta
    shards = len(meta["train_shards"]) + len(meta["val_shards"])
    kept = f" ({summary.kept_shards} kept from an earlier run)" if summary.kept_shards else ""
    return (
        f"wrote {meta['num_train']} train / {meta['num_val']} val samples in {shards} shards{kept} to {out}; "
        f"{meta['num_rejected']} rejected -> {out / REJECTED}"
    )


def _check_settings(settings: ConvertSettings) -> None:
    if not 0 <= settings.val_fraction < 1:
        raise LlavaInputError(f"--val-fraction must be at least 0 and below 1, got {settings.val_fraction}")
    if settings.max_tokens is not None and settings.tokenizer is None:
        raise LlavaInputError("--max-tokens needs --tokenizer (tokens are counted with its chat template)")
    if settings.image_tokens < 0 or (settings.max_tokens is not None and settings.max_tokens < 1):
        raise LlavaInputError("--image-tokens must be at least 0 and --max-tokens at least 1")
    if settings.tokenizer is not None and not (Path(settings.tokenizer) / "tokenizer.json").is_file():
        raise MissingFileError(f"--tokenizer {settings.tokenizer}: no tokenizer.json there")


def _check_apart(json_path: Path, images: Path, out: Path) -> None:
    """``--out`` must be a folder of its own, apart from the input (paths compared resolved, so links and ``..`` are
    seen through): a conversion writes into it and ``--overwrite`` empties it, which would delete the input."""
    resolved, inputs = out.resolve(), images.resolve()
    if resolved == inputs or inputs in resolved.parents:
        where = "is" if resolved == inputs else "is inside"
        raise LlavaInputError(f"--out {out} {where} --images {images}; give an output folder outside the input")
    if resolved in inputs.parents:
        raise LlavaInputError(f"--out {out} holds --images {images}; give an output folder outside the input")
    if resolved in json_path.resolve().parents:
        raise LlavaInputError(f"--out {out} holds --json {json_path}; give an output folder outside the input")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _header(json_path: Path, images: Path, settings: ConvertSettings) -> dict[str, Any]:
    """What the output is made from: the input file (by content), the image folder and the settings."""
    recorded = dataclasses.asdict(settings)
    if settings.tokenizer is not None:
        recorded["tokenizer"] = str(Path(settings.tokenizer).resolve())
        recorded["tokenizer_sha256"] = _sha256(Path(settings.tokenizer) / "tokenizer.json")
    source = {"json": str(json_path.resolve()), "json_sha256": _sha256(json_path), "images": str(images.resolve())}
    return {"format": FORMAT, "version": VERSION, "source": source, "settings": recorded}


def _recorded_header(out: Path) -> dict[str, Any] | None:
    """The header of ``out``'s plan.json; None when there is none (or it is not a conversion's plan)."""
    try:
        plan = json.loads((out / PLAN).read_text())
    except (OSError, ValueError):
        return None
    return plan.get("header") if isinstance(plan, dict) and isinstance(plan.get("header"), dict) else None


def _prepare_out(out: Path, header: dict[str, Any], overwrite: bool) -> dict[str, Any] | None:
    """The plan to resume, or None for a fresh start in an empty ``out``. A folder holding anything else is refused
    without ``overwrite``, and emptied with it."""
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"--out {out} is a file, not a folder")
    recorded = _recorded_header(out)
    if recorded == header:
        return json.loads((out / PLAN).read_text())
    held = [child for child in out.iterdir() if child.name != PLAN + PARTIAL] if out.is_dir() else []
    if held:  # a plan.json.part alone is left by a run killed while saving its plan: nothing to keep
        if not overwrite:
            what = "holds other files"
            if recorded is not None:
                differ = [
                    k
                    for part in ("source", "settings")
                    for k in header[part]
                    if recorded.get(part, {}).get(k) != header[part][k]
                ]
                what = f"holds a conversion with another {', '.join(differ) or 'format version'}"
            raise OutputExistsError(f"--out {out} {what}; pass --overwrite to replace it")
    for child in out.iterdir() if out.is_dir() else ():
        shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return None


def _plan(records: list[Record], verdicts: list[Verdict], header: dict[str, Any]) -> dict[str, Any]:
    """Accepted records shuffled with the seed, the first ``val_fraction`` of them for val (at least one when it is
    above 0, and never the last one: train keeps at least one); a split entry is ``[record index, num_tokens]``.
    Rejected records keep their input order."""
    fraction = header["settings"]["val_fraction"]
    accepted = [[v.index, v.num_tokens] for v in verdicts if v.reason is None]
    random.Random(header["settings"]["seed"]).shuffle(accepted)
    num_val = min(len(accepted) - 1, max(1, round(fraction * len(accepted)))) if fraction and accepted else 0
    rejected = []
    for v in (v for v in verdicts if v.reason is not None):
        record = records[v.index]
        where = {"index": v.index} if record.line is None else {"index": v.index, "line": record.line}
        rid = record.data.get("id") if isinstance(record.data, dict) else None
        rejected.append({"id": rid, **where, "reason": v.reason, "detail": v.detail})
    return {"header": header, "train": accepted[num_val:], "val": accepted[:num_val], "rejected": rejected}


def _meta(plan: dict[str, Any], records: list[Record], shards: dict[str, list[str]]) -> dict[str, Any]:
    images = [len(samples.parse_record(records[index].data).images) for index, _ in plan["train"] + plan["val"]]
    return {
        "format": FORMAT,
        "version": VERSION,
        "source": plan["header"]["source"],
        "settings": plan["header"]["settings"],
        "num_records": len(records),
        "num_train": len(plan["train"]),
        "num_val": len(plan["val"]),
        "num_rejected": len(plan["rejected"]),
        "rejected": dict(sorted(Counter(r["reason"] for r in plan["rejected"]).items())),
        "num_images": sum(images),
        "num_text_only": images.count(0),
        "train_shards": shards["train"],
        "val_shards": shards["val"],
    }


def convert_llava(
    json_path: str | Path,
    images: str | Path,
    out: str | Path,
    settings: ConvertSettings | None = None,
    *,
    workers: int = 1,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> Summary:
    """Convert a LLaVA-Instruct JSON/JSONL file and its image folder into ``out`` (module docstring), or finish an
    interrupted conversion there. ``workers`` > 1 checks records and reads images in that many processes; the
    output does not depend on it. Nothing in ``out`` is touched until the input has been read."""
    json_path, images, out = Path(json_path), Path(images), Path(out)
    settings = settings or ConvertSettings()
    progress = progress or Progress()
    if not json_path.is_file():
        raise MissingFileError(f"--json {json_path}: no such file")
    if not images.is_dir():
        raise MissingFileError(f"--images {images}: no such folder")
    _check_settings(settings)
    _check_apart(json_path, images, out)
    header = _header(json_path, images, settings)
    records = samples.read_records(json_path)
    if not records:
        raise LlavaInputError(f"{json_path} holds no records")
    plan = _prepare_out(out, header, overwrite)
    source, recorded = header["source"], header["settings"]
    check = CheckSettings(
        source["images"], recorded["tokenizer"], settings.chat_template, settings.max_tokens, settings.image_tokens
    )
    shards: dict[str, list[str]] = {}
    kept = 0
    with Workers(workers, check) as pool:
        if plan is None:
            progress.phase("check", len(records))
            verdicts = []
            for verdict in pool.check(records):
                verdicts.append(verdict)
                progress.advance()
            plan = _plan(records, verdicts, header)
            write_text_atomic(out / PLAN, json.dumps(plan) + "\n")
        if not plan["train"]:  # every record rejected: say why, and keep the reasons
            write_text_atomic(out / REJECTED, "".join(json.dumps(r) + "\n" for r in plan["rejected"]))
            reasons = Counter(r["reason"] for r in plan["rejected"])
            counts = ", ".join(f"{reason} {count}" for reason, count in sorted(reasons.items()))
            raise LlavaInputError(
                f"no sample to train on: all {len(records)} records were rejected ({counts}); each is listed with "
                f"its reason in {out / REJECTED}"
            )
        for split in SPLITS:
            entries = [(records[index], tokens) for index, tokens in plan[split]]
            if not entries:  # no val shards with --val-fraction 0
                shards[split] = []
                continue
            names, kept_here = write_split(
                out / split, split, entries, source["images"], settings.shard_bytes, pool, progress
            )
            shards[split], kept = [f"{split}/{name}" for name in names], kept + kept_here
    write_text_atomic(out / REJECTED, "".join(json.dumps(r) + "\n" for r in plan["rejected"]))
    meta = _meta(plan, records, shards)
    write_text_atomic(out / META, json.dumps(meta, indent=2) + "\n")
    return Summary(meta, kept)
