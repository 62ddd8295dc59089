"""Compression-only peer: merge each image's tokens to N_r + N_s, all with full compute (docs/method.md "Peers").

The same token count as Skip-Vision reaches the LLM, but no token is skipped and no summary is added, so the
comparison isolates what skipping and the summaries contribute on top of plain token compression.
"""

from __future__ import annotations

from skipvision.registry import SKIP_POLICIES
from skipvision.skip.policies.none import NoSkip


@SKIP_POLICIES.register("merge_only", tiny={"num_tokens": 4})
class MergeOnly(NoSkip):
    """Each image's N visual tokens are merged into ``num_tokens`` (the compressor of the recipe, token merge by
    default) and all of them run the FFN. The split stage retains everything (as ``none``): the merge is the
    visual pipeline's job (skipvision/skip/visual.py), which reads ``merge_to``."""

    def __init__(self, num_tokens: int) -> None:
        super().__init__()
        if num_tokens < 1:
            raise ValueError(f"merge_only: num_tokens (tokens per image, N_r + N_s) must be >= 1, got {num_tokens}")
        self.merge_to = num_tokens
