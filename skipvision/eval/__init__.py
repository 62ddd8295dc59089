"""Evaluation: eval sets, the benchmarks' metrics, batched generation and reports (docs/evaluation.md).

The names below load on first access, so the CLI's argument parser (``.cli``) imports no torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from skipvision.lazy import lazy_exports

if TYPE_CHECKING:
    from skipvision.eval.data import EvalDataError, EvalItem, check_item, read_eval_set
    from skipvision.eval.runner import (
        ModelResult,
        ModelSpec,
        eval_prompt,
        eval_request,
        generation_config,
        predict,
        run_eval,
    )
    from skipvision.eval.scoring import TASKS, ItemScore, Scored, score

_MODULES = {
    "EvalDataError": "skipvision.eval.data",
    "EvalItem": "skipvision.eval.data",
    "check_item": "skipvision.eval.data",
    "read_eval_set": "skipvision.eval.data",
    "ModelResult": "skipvision.eval.runner",
    "ModelSpec": "skipvision.eval.runner",
    "eval_prompt": "skipvision.eval.runner",
    "eval_request": "skipvision.eval.runner",
    "generation_config": "skipvision.eval.runner",
    "predict": "skipvision.eval.runner",
    "run_eval": "skipvision.eval.runner",
    "TASKS": "skipvision.eval.scoring",
    "ItemScore": "skipvision.eval.scoring",
    "Scored": "skipvision.eval.scoring",
    "score": "skipvision.eval.scoring",
}

__all__ = [
    "TASKS",
    "EvalDataError",
    "EvalItem",
    "ItemScore",
    "ModelResult",
    "ModelSpec",
    "Scored",
    "check_item",
    "eval_prompt",
    "eval_request",
    "generation_config",
    "predict",
    "read_eval_set",
    "run_eval",
    "score",
]

__getattr__, __dir__ = lazy_exports(__name__, _MODULES, __all__)
