"""Token compressors: shrink the skipped candidate group C to N_s tokens (docs/method.md "Token pipeline")."""

from skipvision.compressors import pooling, token_merge

__all__ = ["pooling", "token_merge"]
