"""How the next token is chosen: greedy, or sampling with temperature, top-k and top-p.

The filtering is transformers' own logits warpers; only the loop around them is ours, not HF ``generate()``
(docs/method.md "KV removal", step 3). Sampling draws from a private :class:`torch.Generator` seeded per call, so a
seed reproduces the same texts regardless of global RNG use elsewhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


@dataclass
class GenerationConfig:
    """What to generate. ``temperature`` 0 means greedy (top-k/top-p then must stay unset)."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: Sequence[str] = field(default_factory=tuple)  # stop strings, not included in the returned text
    drop_kv: bool = True  # remove the skipped tokens' K/V after prefill (docs/method.md "KV removal")
    output_logits: bool = False  # keep every step's logits in Generation.logits (for checks and scoring)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.temperature == 0 and (self.top_k is not None or self.top_p is not None):
            raise ValueError("top_k / top_p need sampling: set temperature > 0")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class TokenChooser:
    """Picks the next token of every row from the last logits [B, V]."""

    def __init__(self, config: GenerationConfig, device: torch.device) -> None:
        self.config = config
        self.warpers = LogitsProcessorList()
        if not config.greedy:
            self.warpers.append(TemperatureLogitsWarper(config.temperature))
            if config.top_k is not None:
                self.warpers.append(TopKLogitsWarper(config.top_k))
            if config.top_p is not None:
                self.warpers.append(TopPLogitsWarper(config.top_p))
        self.generator = torch.Generator(device=device)
        if config.seed is not None:
            self.generator.manual_seed(config.seed)
        else:
            self.generator.seed()

    def __call__(self, logits: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        """``logits`` [B, V], ``history`` [B, L] ids so far (some warpers look at them) -> next ids [B]."""
        if self.config.greedy:
            return logits.argmax(-1)  # [B]
        scores = self.warpers(history, logits.float())  # [B, V], filtered entries at -inf
        probs = torch.softmax(scores, dim=-1)  # [B, V]
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(1)  # [B]
