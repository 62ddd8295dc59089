"""Inference: cached generation with explicit positions (METHOD.md section 4)."""
