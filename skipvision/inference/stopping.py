"""When each row of a generation batch ends, and why: EOS, a stop string, ``max_new_tokens`` or the model's context.

Rows end independently but keep sharing the batch's forwards until the last one ends (their later tokens are
dropped). The loop asks "has every row ended?" as seldom as it can, because the answer lives on the device and
reading it makes the host wait for the device:

- :class:`Stopping` keeps each row's end step on the device and updates it with tensor operations only. The budgets
  (``max_new_tokens``, context) are known on the host in advance; EOS needs a look at the tokens, and on CUDA that look
  is read one step late, so the host keeps a step queued ahead (at most one extra forward runs; its tokens are dropped).
- :class:`StopStrings` needs the text, hence the tokens on the host every step; it decodes only each row's newest
  tokens (in a window of a few earlier ones, for context), never the whole answer again.

The reasons are decided once, at the end, in the order EOS, stop string, budget: a token that is EOS ends its row as
"eos" even on the row's last allowed step or when the text also holds a stop string.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase


def decode_text(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]) -> str:
    """The answer text: special tokens dropped, and the space the chat template puts after "ASSISTANT:"."""
    return tokenizer.decode(ids, skip_special_tokens=True).removeprefix(" ")


def eos_set(eos_token_id: int | Sequence[int] | None) -> frozenset[int]:
    """The ids that end a row: one EOS id, several (a chat template's end-of-turn and EOS), or none."""
    if eos_token_id is None:
        return frozenset()
    return frozenset([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id)


def cut_at_stop(text: str, stops: Sequence[str]) -> str | None:
    """The text before the earliest stop string, or None when none occurs."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return text[: min(hits)] if hits else None


@dataclass
class Ending:
    """How one row ended: ``steps`` tokens produced (its EOS included), for ``reason``."""

    steps: int
    reason: str  # "eos" | "stop" | "length" (max_new_tokens) | "context" (model's context is full)


class Stopping:
    """The step at which each row ends, ``ends`` [B] on the device: its budget ``room`` until an EOS or a stop
    string comes earlier. Steps count from 1 (the prefill's token)."""

    def __init__(
        self,
        room: list[int],
        max_new_tokens: int,
        eos_token_id: int | Sequence[int] | None,
        device: torch.device,
        stop_strings: bool = False,
    ) -> None:
        self.last, self.max_new_tokens, self.eos = max(room), max_new_tokens, eos_set(eos_token_id)
        self.eos_ids = torch.tensor(sorted(self.eos), dtype=torch.long, device=device)  # [E]
        self.ends = torch.tensor(room, device=device)  # [B]
        self.stopped: dict[int, int] = {}  # row -> step of its first stop string
        self.can_end_early = bool(self.eos) or stop_strings
        # Read the "all ended?" answer a step late only where it saves a wait: on CUDA, when nothing else (stop
        # strings) already brings the tokens to the host every step.
        self.late = device.type == "cuda" and not stop_strings
        self.pending: tuple[torch.Tensor, torch.cuda.Event] | None = None

    def update(self, step: int, token: torch.Tensor) -> None:
        """Step ``step`` chose ``token`` [B]: an EOS ends its row here unless the row has ended before."""
        if self.eos:
            ended = torch.isin(token, self.eos_ids)  # [B]
            self.ends = torch.where(ended, self.ends.clamp(max=step), self.ends)  # [B]

    def stop(self, rows: list[int], step: int) -> None:
        """A stop string showed up at ``step`` in each of ``rows`` (the host's finding; rows that have ended keep
        their end)."""
        if not rows:
            return
        for row in rows:
            self.stopped.setdefault(row, step)
        index = torch.tensor(rows, device=self.ends.device)  # [R]
        self.ends[index] = self.ends[index].clamp(max=step)

    def done(self, step: int) -> bool:
        """Whether the loop can stop after ``step``: every row has ended (possibly learned one step late on CUDA).

        Waits for the device only when a row can end before its budget (EOS or stop strings) and the budgets alone
        do not settle it."""
        if step >= self.last:
            return True
        if not self.can_end_early:
            return False
        ended = (self.ends <= step).all()  # [] bool on the device
        if not self.late:
            return bool(ended)
        flag = torch.empty((), dtype=torch.bool, pin_memory=True)
        flag.copy_(ended, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.ends.device))
        previous, self.pending = self.pending, (flag, event)
        if previous is None:
            return False
        previous[1].synchronize()  # the previous step's answer: the device is already busy with this step
        return bool(previous[0])

    def endings(self, tokens: list[list[int]]) -> list[Ending]:
        """Each row's ending, from the batch's tokens [B][steps run] on the host."""
        result = []
        for row, end in enumerate(self.ends.tolist()):
            if tokens[row][end - 1] in self.eos:
                reason = "eos"
            elif self.stopped.get(row) == end:
                reason = "stop"
            else:
                reason = "length" if end >= self.max_new_tokens else "context"
            result.append(Ending(end, reason))
        return result


class _RowText:
    """One row's text, kept up to date one token at a time by decoding a short window of tokens.

    ``ids[:read]`` are settled: their text ``text[:settled]`` will not change. Each new token is decoded together with
    ``ids[prefix:read]`` (the tokens settled last), whose own decoding is then cut off the front, so decoders that
    treat a sequence's first token specially (a dropped leading space) see the same context as in the full text. A
    tail that ends in U+FFFD may be a character whose remaining bytes are still to come: it stays unsettled (it is
    decoded again with the next token) but is part of ``text`` meanwhile, as in the full decoding. If the window's
    text does not extend the settled one (a decoder that rewrites earlier text, such as the clean-up of spaces before
    punctuation), the whole text is decoded once instead.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""  # the decoding of ids, the template's space not yet dropped
        self.prefix = self.read = self.settled = 0

    def _decode(self, start: int, stop: int) -> str:
        return self.tokenizer.decode(self.ids[start:stop], skip_special_tokens=True)

    def append(self, token: int) -> int:
        """Adds ``token``; returns the index of the first character of ``text`` that may have changed."""
        self.ids.append(token)
        before, after = self._decode(self.prefix, self.read), self._decode(self.prefix, len(self.ids))
        changed = self.settled
        if after.startswith(before):
            self.text = self.text[: self.settled] + after[len(before) :]
        else:
            self.text, changed = self._decode(0, len(self.ids)), 0
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read, self.settled = self.read, len(self.ids), len(self.text)
        return changed


class StopStrings:
    """Finds, per row, the first step whose text (as :func:`decode_text` gives it) holds a stop string.

    Each step decodes only the rows' newest tokens (:class:`_RowText`) and searches only the text that may hold a new
    match: the changed tail and the ``longest stop - 1`` characters before it. A match is confirmed on the full
    decoding, which also gives the row's final text, cut before the stop string. Rows stop being fed after their EOS
    or their stop string.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        stops: Sequence[str],
        batch: int,
        eos_token_id: int | Sequence[int] | None,
    ) -> None:
        self.tokenizer, self.stops, self.eos = tokenizer, tuple(stops), eos_set(eos_token_id)
        self.reach = max(len(s) for s in self.stops) - 1  # characters before the changed tail a match may start at
        self.rows = [_RowText(tokenizer) for _ in range(batch)]
        self.texts: dict[int, str] = {}  # row -> its text cut before the first stop string
        self.ended: set[int] = set()

    def feed(self, tokens: list[int]) -> list[int]:
        """Appends one step's tokens [B]; returns the rows whose text now holds a stop string."""
        hits = []
        for row, token in enumerate(tokens):
            if row in self.ended:
                continue
            if token in self.eos:
                self.ended.add(row)
                continue
            state = self.rows[row]
            changed = state.append(token)
            lead = 1 if state.text.startswith(" ") else 0  # the template's space is not part of the answer
            start = max(lead, changed - self.reach)
            if not any(state.text.find(s, start) >= 0 for s in self.stops):
                continue
            text = cut_at_stop(decode_text(self.tokenizer, state.ids), self.stops)
            if text is not None:
                self.texts[row] = text
                self.ended.add(row)
                hits.append(row)
        return hits
