"""What a request cost: time to first token, decode ms/token and KV-cache bytes (docs/benchmarks.md).

The generation loop marks the moment each step's token is chosen on a :class:`StepClock` and reads the marks once,
after the loop. On CUDA the marks are events queued on the device's stream, so timing never makes the host wait for
the device between steps (a per-step ``synchronize`` would stop the host from queuing the next step while the device
still runs this one, and so slow down the very decode it measures). On the CPU every operation has finished when it
returns, and the marks are plain wall-clock readings.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass
class GenerationStats:
    """Per request. Times are the batch's (its rows share every forward); KV bytes count this row's real positions.

    ``kv_bytes_prefill``: the row's K/V after prefill; ``kv_bytes_kept``: after removal (equal without removal).
    ``ms_per_token``: decode time per token after the first (None when only one token was produced).
    """

    prompt_tokens: int
    generated_tokens: int
    ttft_ms: float
    ms_per_token: float | None
    kv_bytes_prefill: int
    kv_bytes_kept: int
    finish_reason: str  # "eos" | "stop" | "length" (max_new_tokens) | "context" (model's context is full)


class StepClock:
    """Seconds from the clock's creation until each :meth:`mark`, measured where the work runs.

    CUDA: the start and every mark are timing events on the device's current stream; a mark's time is when the device
    reached it, that is when everything queued before it (the step's forward and token choice) had run.
    """

    def __init__(self, device: torch.device) -> None:
        self.stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
        self.start = time.perf_counter()  # off CUDA
        self.stamps: list[float] = []  # off CUDA: seconds since start, per mark
        self.events = [] if self.stream is None else [self._event()]  # CUDA: the start, then one event per mark

    def _event(self) -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record(self.stream)
        return event

    def mark(self) -> None:
        """Note that the work queued so far (this step's token) is done at this point; never waits for the device."""
        if self.stream is None:
            self.stamps.append(time.perf_counter() - self.start)
        else:
            self.events.append(self._event())

    def seconds(self) -> list[float]:
        """Seconds from the start to each mark, in order. On CUDA this waits once, for the last mark."""
        if self.stream is None:
            return list(self.stamps)
        start, *marks = self.events
        if marks:
            marks[-1].synchronize()
        return [start.elapsed_time(event) / 1000 for event in marks]


def step_times(seconds: list[float], steps: int) -> tuple[float, float | None]:
    """(time to first token, decode ms per token after the first) in ms, for a row that produced ``steps`` tokens
    (its EOS included) from the marks ``seconds`` of its batch's steps."""
    ttft_ms = seconds[0] * 1000
    if steps < 2:
        return ttft_ms, None
    return ttft_ms, (seconds[steps - 1] - seconds[0]) * 1000 / (steps - 1)
