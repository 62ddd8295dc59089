"""The writing half of ``skipvision data llava`` (skipvision/data/llava.py): the worker processes, and shards that
survive an interruption (docs/data.md "Resume").

A split's samples go through webdataset's ``ShardWriter`` in plan order; a shard is written as
``llava-<split>-NNNNNN.tar.part`` and renamed to ``.tar`` once closed, so a ``.tar`` is always complete. Resuming
keeps the complete shards that hold the plan's first samples (checked by their sample keys and tar's end-of-archive
marker) and restarts the writer at the next sample with the next shard number: a ``ShardWriter`` closes a shard by
the size of that shard's own samples only, so it cuts the same shards an uninterrupted run cuts.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import signal
import tarfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from skipvision.atomic import PARTIAL
from skipvision.data import llava_samples as samples
from skipvision.data.llava_samples import CheckSettings, Record, Verdict
from skipvision.errors import DataError

if TYPE_CHECKING:
    from skipvision.data.llava import Progress

TAR_BLOCK = 512
CHUNK = 16  # records per task sent to a worker process


_checker: samples.Checker | None = None  # a worker process's own (its tokenizer loads once)


def _start_worker(settings: CheckSettings) -> None:
    """A worker ignores Ctrl-C (it reaches the whole process group): the main process stops the pool."""
    global _checker
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _checker = samples.Checker(settings)


def _check(record: Record) -> Verdict:
    assert _checker is not None, "the worker process was started without _start_worker"
    return _checker(record)


def _build(job: tuple[Record, int | None, str]) -> dict[str, Any]:
    """The sample of a planned record; an image gone or unreadable since the check (an input changed between the
    check and the write, or before a resume) is one line naming the record and the image."""
    record, num_tokens, images = job
    try:
        return samples.build_sample(record, num_tokens, images)
    except samples.Rejected as err:
        rid = record.data.get("id") if isinstance(record.data, dict) else None
        named = ([] if rid is None else [f"id {rid!r}"]) + ([] if record.line is None else [f"line {record.line}"])
        where = ", ".join(named)
        raise DataError(
            f"record {record.index}{f' ({where})' if where else ''}: {err.detail} ({err.reason}), but it was "
            "readable when the input was checked (plan.json): restore the image, or convert again with --overwrite"
        ) from None


def _apply(fn: Callable[[Any], Any], chunk: list[Any]) -> list[Any]:
    return [fn(item) for item in chunk]


class Workers:
    """Checks records and builds samples, in order: in this process (``count`` 1) or in ``count`` spawned processes
    (spawned: forking a process that may hold tokenizer threads is unsafe). Results come back in input order with
    at most two chunks per process in flight, so built samples (image bytes) never pile up ahead of the writer."""

    def __init__(self, count: int, settings: CheckSettings) -> None:
        self.count = max(1, count)
        self.pool: ProcessPoolExecutor | None = None
        self.checker: Callable[[Record], Verdict] = _check
        if self.count == 1:
            self.checker = samples.Checker(settings)
        else:
            context = multiprocessing.get_context("spawn")
            self.pool = ProcessPoolExecutor(
                self.count, mp_context=context, initializer=_start_worker, initargs=(settings,)
            )

    def check(self, records: Iterable[Record]) -> Iterator[Verdict]:
        return self._map(self.checker, records)

    def build(self, jobs: Iterable[tuple[Record, int | None, str]]) -> Iterator[dict[str, Any]]:
        return self._map(_build, jobs)

    def _map(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]:
        if self.pool is None:
            yield from map(fn, items)
            return
        pending: deque[Any] = deque()
        items = iter(items)
        while chunk := list(itertools.islice(items, CHUNK)):
            pending.append(self.pool.submit(_apply, fn, chunk))
            if len(pending) >= 2 * self.count:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)


def shard_name(split: str, number: int) -> str:
    return f"llava-{split}-{number:06d}.tar"


def shard_keys(path: Path) -> list[str] | None:
    """The sample keys of a complete shard, in order; None when it lacks tar's end-of-archive marker."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        f.seek(max(0, size - 2 * TAR_BLOCK))
        if size % TAR_BLOCK or any(f.read()):
            return None
    keys: list[str] = []
    with tarfile.open(path) as tar:
        for name in tar.getnames():
            key = name.split(".", 1)[0]
            if not keys or keys[-1] != key:
                keys.append(key)
    return keys


def finished_shards(folder: Path, split: str, keys: list[str]) -> tuple[list[str], int]:
    """The complete shards holding the first of ``keys`` (the split's plan), in order, and how many samples they
    hold. Partial shards and shards that do not continue the plan are deleted: they are written again."""
    for part in folder.glob(f"*{PARTIAL}"):
        part.unlink()
    names: list[str] = []
    done = 0
    while (folder / (name := shard_name(split, len(names)))).is_file():
        held = shard_keys(folder / name)
        if not held or held != keys[done : done + len(held)]:
            break
        names.append(name)
        done += len(held)
    for stale in folder.glob(f"llava-{split}-*.tar"):
        if stale.name not in names:
            stale.unlink()
    return names, done


class _Renamer:
    """ShardWriter's ``post``: a shard it closes is complete and loses its ``.part``, unless an interruption closes
    the writer, which leaves the shard partial (and deleted on resume)."""

    def __init__(self, names: list[str]) -> None:
        self.names, self.interrupted = names, False

    def __call__(self, part: str) -> None:
        if not self.interrupted:
            final = part.removesuffix(PARTIAL)
            os.replace(part, final)
            self.names.append(Path(final).name)


def write_split(
    folder: Path,
    split: str,
    entries: list[tuple[Record, int | None]],
    images: str,
    shard_bytes: int,
    workers: Workers,
    progress: Progress,
) -> tuple[list[str], int]:
    """Write, or finish, one split's shards into ``folder``: ``entries`` are the plan's (record, num_tokens) in
    order. Returns the shard file names and how many of them an earlier run had written."""
    import webdataset as wds

    folder.mkdir(exist_ok=True)
    names, done = finished_shards(folder, split, [samples.sample_key(record.index) for record, _ in entries])
    kept = len(names)
    progress.phase(split, len(entries), done)
    if done == len(entries):
        return names, kept
    pattern = str(folder).replace("%", "%%") + f"/llava-{split}-%06d.tar{PARTIAL}"
    post = _Renamer(names)
    # Shards by bytes only; fixed mtimes (and tar's fixed owner and mode) make the bytes reproducible.
    writer = wds.ShardWriter(
        pattern, maxcount=2**62, maxsize=shard_bytes, post=post, start_shard=kept, verbose=0, mtime=0.0
    )
    try:
        for sample in workers.build((record, tokens, images) for record, tokens in entries[done:]):
            writer.write(sample)
            progress.advance()
    except BaseException:
        post.interrupted = True
        raise
    finally:
        writer.close()
    return names, kept
