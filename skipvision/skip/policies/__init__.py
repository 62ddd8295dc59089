"""Skip policies: split each image's visual tokens into retained R and skip candidates C (docs/method.md "Policies")."""

from skipvision.skip.policies import (
    attention_score,
    fastv,
    merge_only,
    mod_router,
    none,
    prefix,
    pyramid_drop,
    router,
    uniform,
)
from skipvision.skip.policies.base import DropStage, SkipPolicy, TokenSplit

__all__ = [
    "DropStage",
    "SkipPolicy",
    "TokenSplit",
    "attention_score",
    "fastv",
    "merge_only",
    "mod_router",
    "none",
    "prefix",
    "pyramid_drop",
    "router",
    "uniform",
]
