"""Token compressors: shrink the skipped candidate group C to N_s tokens (METHOD.md section 2)."""

from skipvision.compressors import pooling, token_merge

__all__ = ["pooling", "token_merge"]
