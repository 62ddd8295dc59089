"""Benchmark output: ratios against the baseline, a JSON file, a Markdown table and a PNG plot.

Ratios are variant / baseline measured in the same run; ``ideal`` ratios come from :mod:`skipvision.costs`;
achieved/ideal is ideal ratio / achieved ratio, the share of the ideal saving reached (1.0: time fell exactly as much
as FLOPs).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# measured figure -> the ideal figure it is compared with
IDEAL_OF = {
    "train_step_ms": "train_step_flops",
    "prefill_flops": "prefill_flops",
    "ttft_ms": "prefill_flops",
    "kv_bytes": "kv_positions",
}


def add_ratios(result: dict[str, Any]) -> dict[str, Any]:
    """Fill ``ratio``, ``ideal_ratio`` and ``achieved_over_ideal`` of every variant (in place; returns result)."""
    variants = result["variants"]
    base = variants[result["baseline"]]
    for fig in variants.values():
        ratio = {k: fig[k] / base[k] for k in IDEAL_OF}
        for rows, ms in fig["decode_ms_per_token"].items():
            ratio[f"decode_ms_per_token@{rows}"] = ms / base["decode_ms_per_token"][rows]
        ratio["train_peak_mem_bytes"] = fig["train_peak_mem_bytes"] / base["train_peak_mem_bytes"]
        ideal = {k: fig["ideal"][src] / base["ideal"][src] for k, src in IDEAL_OF.items()}
        for rows in fig["decode_ms_per_token"]:
            ideal[f"decode_ms_per_token@{rows}"] = fig["ideal"]["decode_flops"] / base["ideal"]["decode_flops"]
        fig["ratio"] = ratio
        fig["ideal_ratio"] = ideal
        fig["achieved_over_ideal"] = {k: ideal[k] / ratio[k] for k in ideal if ratio[k] > 0}
    return result


def _mb(n: float) -> str:
    return f"{n / 2**20:.2f}"


def _ratios(fig: dict[str, Any], key: str, achieved: bool = False) -> str:
    """``(ratio / ideal)`` or ``(ratio / ideal / achieved-over-ideal)`` of one figure."""
    parts = [fig["ratio"][key], fig["ideal_ratio"][key]] + ([fig["achieved_over_ideal"][key]] if achieved else [])
    return "(" + " / ".join(f"{x:.3f}" for x in parts) + ")"


def markdown(result: dict[str, Any]) -> str:
    """The side-by-side table (ratios to the baseline in brackets; ideal ratio and achieved/ideal after a slash)."""
    rows_b = list(next(iter(result["variants"].values()))["decode_ms_per_token"])
    head = [
        "variant",
        "visual slots",
        "train step ms (ratio / ideal / ach.)",
        "train peak MiB (ratio)",
        "prefill GFLOPs (ratio / ideal)",
        "TTFT ms (ratio / ideal / ach.)",
        *[f"decode ms/tok b{r} (ratio / ideal)" for r in rows_b],
        "KV MiB (ratio / ideal)",
        "accuracy all",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, f in result["variants"].items():
        acc = f.get("accuracy")
        cells = [
            name,
            str(f["visual_slots"]),
            f"{f['train_step_ms']:.0f} {_ratios(f, 'train_step_ms', achieved=True)}",
            f"{_mb(f['train_peak_mem_bytes'])} ({f['ratio']['train_peak_mem_bytes']:.2f})",
            f"{f['prefill_flops'] / 1e9:.2f} {_ratios(f, 'prefill_flops')}",
            f"{f['ttft_ms']:.1f} {_ratios(f, 'ttft_ms', achieved=True)}",
            *[f"{f['decode_ms_per_token'][b]:.2f} {_ratios(f, f'decode_ms_per_token@{b}')}" for b in rows_b],
            f"{_mb(f['kv_bytes'])} {_ratios(f, 'kv_bytes')}",
            "n/a" if acc is None else f"{100 * acc['all']:.1f}%",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def accuracy_table(result: dict[str, Any]) -> str:
    """Answer accuracy per question type (only variants with a measured accuracy)."""
    measured = {n: f["accuracy"] for n, f in result["variants"].items() if f.get("accuracy")}
    if not measured:
        return ""
    types = sorted({t for acc in measured.values() for t in acc}, key=lambda t: (t != "all", t))
    lines = ["| variant | " + " | ".join(types) + " |", "|" + "---|" * (len(types) + 1)]
    for name, acc in measured.items():
        lines.append(f"| {name} | " + " | ".join(f"{100 * acc.get(t, float('nan')):.1f}" for t in types) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> Path | None:
    """Accuracy against prefill FLOPs (ratio to the baseline), bubble area proportional to the training step time.
    None when no variant has an accuracy."""
    points = {n: f for n, f in result["variants"].items() if f.get("accuracy")}
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    largest = max(f["train_step_ms"] for f in points.values())
    for name, f in points.items():
        x, y = f["ratio"]["prefill_flops"], 100 * f["accuracy"]["all"]
        ax.scatter(x, y, s=1500 * f["train_step_ms"] / largest, alpha=0.5)
        ax.annotate(f"{name}\n{f['train_step_ms']:.0f} ms/step", (x, y), ha="center", va="center", fontsize=8)
    ax.set_xlabel(f"prefill FLOPs / {result['baseline']}")
    ax.set_ylabel("answer accuracy, all questions (%)")
    ax.set_title(f"{result['recipe']}: bubble area = training step time")
    ax.set_xlim(0, 1.15)
    ax.margins(y=0.25)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write(result: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """``bench.json``, ``bench.md`` (both tables) and ``bench.png`` in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"json": out_dir / "bench.json", "markdown": out_dir / "bench.md"}
    files["json"].write_text(json.dumps(result, indent=2) + "\n")
    files["markdown"].write_text(markdown(result) + "\n" + accuracy_table(result))
    png = plot(result, out_dir / "bench.png")
    if png is not None:
        files["png"] = png
    return files
