"""Skip policies: split each image's visual tokens into retained R and skip candidates C (docs/method.md "Policies")."""

from skipvision.skip.policies import attention_score, fastv, merge_only, none, prefix, router, uniform
from skipvision.skip.policies.base import SkipPolicy, TokenSplit

__all__ = [
    "SkipPolicy",
    "TokenSplit",
    "attention_score",
    "fastv",
    "merge_only",
    "none",
    "prefix",
    "router",
    "uniform",
]
