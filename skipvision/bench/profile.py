"""Where a variant spends its time: torch.profiler over one training step and one prefill (issue "profile before
optimising").

The skip machinery is labelled with ``record_function("skipvision::...")`` ranges: the policy split, the merge,
the summaries, the Skip-FFN plan and its gather/scatter, the KV removal, FastV's attention row and pruning. The
summary gives each label's total time and its share of the step, next to the profiler's top operators.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

LABEL = "skipvision::"


def profile_once(fn: Callable[[], Any], device: torch.device) -> dict[str, Any]:
    """Profile one call of ``fn`` after an unprofiled warm-up call (one-time kernel setup is not the method's cost):
    total self time (ms), per-label time (ms) and the top-operator table."""
    fn()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
    events = prof.key_averages()
    total_ms = sum(e.self_cpu_time_total for e in events) / 1000
    labels = {e.key: e.cpu_time_total / 1000 for e in events if e.key.startswith(LABEL)}
    return {
        "total_ms": total_ms,
        "labels_ms": dict(sorted(labels.items())),
        "skip_machinery_share": sum(labels.values()) / total_ms if total_ms else 0.0,
        "table": events.table(sort_by="self_cpu_time_total", row_limit=15),
    }


def summary(name: str, what: str, prof: dict[str, Any]) -> str:
    """A short text block: the labels' times and shares, then the top operators."""
    lines = [f"== {name}: {what}, {prof['total_ms']:.1f} ms profiled =="]
    for label, ms in prof["labels_ms"].items():
        lines.append(f"  {label:<32} {ms:8.2f} ms  {100 * ms / prof['total_ms']:5.1f}%")
    lines.append(f"  skip machinery in total: {100 * prof['skip_machinery_share']:.1f}% of the profiled time")
    return "\n".join(lines) + "\n" + prof["table"] + "\n"
