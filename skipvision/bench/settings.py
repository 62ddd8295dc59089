"""The ``bench`` section of a recipe: which variants ``python -m skipvision bench`` measures, and how.

The benchmark owns this section; the core recipe schema (skipvision/recipe.py) only places it at ``bench``. No heavy
imports here, so loading a recipe does not load the benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class BenchSettings:
    """Variants of the recipe measured side by side (skipvision/bench/runner.py; docs/benchmarks.md)."""

    baseline: str = "full"  # the variant every ratio is taken against
    variants: dict[str, list[str]] = field(default_factory=lambda: {"full": ["model.skip.policy=none"]})
    weights_from: dict[str, str] = field(default_factory=dict)  # training-free variants use another's weights
    train_batch: int = 8  # samples per timed training step
    decode_batches: list[int] = field(default_factory=lambda: [1, 16])
    decode_tokens: int = 16  # generated tokens per decode measurement
    warmup: int = 2  # untimed repetitions per measurement
    repeats: int = 5  # timed repetitions (median); variants take turns so noise hits them alike
    val_samples: int = 200  # validation questions for answer accuracy
