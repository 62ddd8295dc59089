"""The generation loop: prefill exactly as in training, remove the skipped K/V, decode (docs/method.md "KV removal").

1. Prefill the whole (left-padded) prompt batch with the cache on and the Skip-FFN plan of training.
2. With ``drop_kv``, remove the skipped slots' keys/values from every layer, per sample (:mod:`.kv`); the 2-D mask
   is pruned the same way. A policy with in-LLM ``drop_stages`` (FastV, PyramidDrop) drops its image tokens inside
   the prefill instead.
3. Decode one token at a time over the reduced cache with explicit position ids that continue at each row's true
   position (never from the cache length or the pruned mask), so RoPE phases stay those of the full sequence.

The first generated token comes from the prefill pass and has still seen the skipped tokens. The loop is ours (not
HF ``generate()``, which would derive positions from the pruned cache) and only strings the pieces together: the
next token (:class:`.sampling.TokenChooser`), when each row ends (:mod:`.stopping`: EOS, stop strings,
``max_new_tokens`` and the model's context, per row) and the timings (:mod:`.stats`). Nothing in a step waits for
the device unless stop strings need the text (or, on CUDA, one step late, whether every row has hit its EOS).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from skipvision.adapters import FULL, SLIDING, DecoderAdapter, adapter_for
from skipvision.errors import SkipvisionError
from skipvision.inference.kv import kv_cache_bytes, prune_mask, stored_lengths
from skipvision.inference.sampling import GenerationConfig, TokenChooser
from skipvision.inference.stats import GenerationStats, StepClock, step_times
from skipvision.inference.stopping import Stopping, StopStrings, decode_text
from skipvision.model import VisionLanguageModel, positions_from_mask
from skipvision.skip.in_llm import prefill as method_prefill


class PromptTooLongError(SkipvisionError, ValueError):
    """A prompt (image slots included) leaves no room in the model's context."""


@dataclass
class Generation:
    token_ids: list[int]  # without the EOS
    text: (
        str | None
    )  # decoded, the template's leading space dropped (stop string and after removed); None without a tokenizer
    stats: GenerationStats
    logits: torch.Tensor | None = None  # [steps, V] the logits each token was chosen from (output_logits only)


@dataclass
class Prefilled:
    logits: torch.Tensor  # [B, V] at each row's last prompt position
    mask: torch.Tensor  # [B, K] 2-D mask over the cache columns after removal (0: padding or filler)
    positions: torch.Tensor  # [B, K] the true position of each cache column
    kv_bytes: int  # the whole cache's bytes right after the prefill forward
    layers: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per decoder layer, its columns' mask and true
    # positions [B, K_l], when layers hold different columns (a whole-layer router); else every layer's are the above

    @property
    def kept(self) -> torch.Tensor:
        """[B] real (unmasked) cache positions per row after removal, averaged over the layers when they differ."""
        if self.layers is None:
            return self.mask.sum(-1)
        return torch.stack([mask.sum(-1) for mask, _ in self.layers]).float().mean(0)


def context_limit(model: VisionLanguageModel) -> int | None:
    return getattr(model.backbone.config, "max_position_embeddings", None)


def check_context(lengths: list[int], limit: int | None) -> None:
    """Raise PromptTooLongError for the first prompt that leaves no room to generate."""
    if limit is None:
        return
    for i, length in enumerate(lengths):
        if length >= limit:
            raise PromptTooLongError(
                f"prompt {i} has {length} tokens (image slots included) but the model's context is {limit} "
                f"positions, which leaves no room to generate; shorten the prompt"
            )


@torch.no_grad()
def prefill(
    model: VisionLanguageModel,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    pixel_values: torch.Tensor | None,
    num_images: torch.Tensor | None,
    cache: DynamicCache,
    drop_kv: bool,
) -> Prefilled:
    """Steps 1-2: the training forward with the cache on, then the removal. ids/mask [B, P] (left-padded)."""
    embedded = model.embed(prompt_ids, pixel_values, num_images)  # embeds [B, P, D]
    positions = positions_from_mask(prompt_mask)  # [B, P]
    out = method_prefill(model, embedded, prompt_mask, positions, cache, drop_kv)
    logits, removal, kv_bytes = out.logits, out.removal, out.kv_bytes
    if out.layer_columns is not None:
        columns = [(c, c.index.to(positions.device)) for c in out.layer_columns]
        layers = [(prune_mask(prompt_mask, c), positions.gather(1, index)) for c, index in columns]  # [B, K_l] each
        return Prefilled(logits, prompt_mask, positions, kv_bytes, layers)
    if removal is None:
        return Prefilled(logits, prompt_mask, positions, kv_bytes)
    columns = removal.index.to(positions.device)  # [B, K]
    return Prefilled(logits, prune_mask(prompt_mask, removal), positions.gather(1, columns), kv_bytes)


@torch.no_grad()
def generate_tokens(
    model: VisionLanguageModel,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    pixel_values: torch.Tensor | None,
    num_images: torch.Tensor | None,
    config: GenerationConfig,
    eos_token_id: int | Sequence[int] | None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    agree: Callable[[bool], bool] | None = None,
) -> list[Generation]:
    """Generate for a left-padded prompt batch ``prompt_ids``/``prompt_mask`` [B, P] with its images.

    ``num_images`` [B] says how many of ``pixel_values`` [M, ...] belong to each row, in order (0: text-only).
    Stop strings and texts need ``tokenizer``. Tokens stay on the device until the end; the host reads them every
    step only for stop strings (:mod:`.stopping`), and the timing never waits for the device (:mod:`.stats`).

    ``agree`` (distributed validation) takes this process's "every row has ended" after each step and returns
    whether every process's rows have: the loop runs until all agree, so every rank runs the same number of forwards
    and joins the same collectives (docs/distributed.md "SPMD"); the extra steps' tokens are dropped.
    """
    if config.stop and tokenizer is None:
        raise ValueError("stop strings need a tokenizer to decode the generated text")
    lengths = prompt_mask.sum(-1).tolist()  # real prompt lengths
    limit = context_limit(model)
    check_context(lengths, limit)
    batch, device = prompt_ids.shape[0], prompt_ids.device
    room = [config.max_new_tokens if limit is None else min(config.max_new_tokens, limit - n) for n in lengths]

    clock = StepClock(device)
    cache = DynamicCache(config=model.backbone.config)
    pre = prefill(model, prompt_ids, prompt_mask, pixel_values, num_images, cache, config.drop_kv)
    next_pos = positions_from_mask(prompt_mask)[:, -1:] + 1  # [B, 1]
    decoder = Decoder(model.backbone, cache, pre.mask, pre.positions, next_pos, pre.layers)
    chooser = TokenChooser(config, device)
    stopping = Stopping(room, config.max_new_tokens, eos_token_id, device, stop_strings=bool(config.stop))
    stop_strings = StopStrings(tokenizer, config.stop, batch, eos_token_id) if config.stop else None
    width = config.max_new_tokens if agree is not None else max(room)  # other ranks may run up to the full budget
    tokens = prompt_ids.new_zeros(batch, width)  # [B, steps] the chosen ids, on the device
    logits = pre.logits  # [B, V] the logits the next token is chosen from
    step_logits = []  # per step [B, V] (output_logits only)
    step = 0
    while True:
        token = chooser(logits, tokens[:, :step])  # [B]
        clock.mark()
        tokens[:, step] = token
        step += 1
        if config.output_logits:
            step_logits.append(logits.float())
        stopping.update(step, token)
        if stop_strings is not None:
            stopping.stop(stop_strings.feed(token.tolist()), step)
        finished = stopping.done(step)
        if agree is not None:
            finished = agree(finished)
        if finished:
            break
        logits = decoder(token)

    per_position = kv_cache_bytes(cache) // max(1, batch * cache.get_seq_length())  # bytes per cached position
    if pre.layers is not None:  # layers hold different columns: one layer's bytes per column, times the layers
        columns = sum(layer.keys.shape[2] for layer in cache.layers)  # every layer's, summed
        per_position = len(pre.layers) * kv_cache_bytes(cache) // max(1, batch * columns)
    chosen = tokens[:, :step].tolist()
    all_logits = torch.stack(step_logits, dim=1) if config.output_logits else None  # [B, steps, V]
    seconds = clock.seconds()
    results = []
    for row, (ending, kept) in enumerate(zip(stopping.endings(chosen), pre.kept.tolist(), strict=True)):
        ids = chosen[row][: ending.steps - 1 if ending.reason == "eos" else ending.steps]  # without the EOS
        if stop_strings is not None and ending.reason == "stop":
            text = stop_strings.texts[row]
        else:
            text = None if tokenizer is None else decode_text(tokenizer, ids)
        ttft_ms, ms_per_token = step_times(seconds, ending.steps)
        stats = GenerationStats(
            prompt_tokens=lengths[row],
            generated_tokens=len(ids),
            ttft_ms=ttft_ms,
            ms_per_token=ms_per_token,
            kv_bytes_prefill=per_position * lengths[row] if pre.layers is None else round(per_position * kept),
            kv_bytes_kept=round(per_position * kept),
            finish_reason=ending.reason,
        )
        row_logits = None if all_logits is None else all_logits[row, : ending.steps]  # [steps, V]
        results.append(Generation(ids, text, stats, row_logits))
    return results


class Decoder:
    """Step 3: one forward of one token per row over the cache, at each row's true next position.

    It keeps the cache columns' validity ``mask`` and true positions ``key_pos`` [B, K + steps fed] (starting from
    the prefill's, after any removal), from which each step's masks are built (:func:`decode_masks`), and the rows'
    next positions ``next_pos`` [B, 1]. With ``layers`` (per decoder layer, its own columns' mask and positions: a
    whole-layer router's cache), each layer gets its own mask (full-attention layers only)."""

    def __init__(
        self,
        backbone: PreTrainedModel,
        cache: DynamicCache,
        mask: torch.Tensor,
        key_pos: torch.Tensor,
        next_pos: torch.Tensor,
        layers: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> None:
        self.backbone, self.cache = backbone, cache
        self.adapter = adapter_for(backbone.config)
        # Only the masks' batch, dtype and device are read off it.
        self.probe = torch.empty(mask.shape[0], 1, 1, dtype=backbone.dtype, device=mask.device)
        self.mask, self.key_pos, self.next_pos = mask, key_pos, next_pos  # [B, K], [B, K], [B, 1]
        self.layers = layers  # per layer ([B, K_l], [B, K_l])

    def __call__(self, token: torch.Tensor) -> torch.Tensor:
        """Feeds ``token`` [B]; returns the logits [B, V] of the next one."""
        if self.layers is not None:
            return self._per_layer(token)
        self.mask, self.key_pos = extend(self.mask, self.key_pos, self.next_pos)  # [B, K + L] each
        masks = decode_masks(self.adapter, self.cache, self.probe, self.next_pos, self.key_pos, self.mask)
        return self._step(token, masks)

    def _per_layer(self, token: torch.Tensor) -> torch.Tensor:
        """A step whose decoder layers each attend over their own columns: a forward pre-hook hands each its mask."""
        self.layers = [extend(mask, key_pos, self.next_pos) for mask, key_pos in self.layers]  # [B, K_l + L] each
        masks = [self.adapter.type_masks(self.probe, self.next_pos, pos, mask)[FULL] for mask, pos in self.layers]
        handles = [
            layer.register_forward_pre_hook(partial(with_mask, mask), with_kwargs=True)
            for layer, mask in zip(self.adapter.layers(self.backbone), masks, strict=True)
        ]
        try:
            return self._step(token, masks[0])
        finally:
            for handle in handles:
                handle.remove()

    def _step(self, token: torch.Tensor, masks: torch.Tensor | dict[str, torch.Tensor]) -> torch.Tensor:
        out = self.backbone(
            input_ids=token[:, None], attention_mask=masks, position_ids=self.next_pos, cache=self.cache, use_cache=True
        )
        self.next_pos = self.next_pos + 1
        return out.logits[:, -1]  # [B, V]


def extend(mask: torch.Tensor, key_pos: torch.Tensor, next_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The columns' mask and positions [B, K] with the new token's column (valid, at ``next_pos`` [B, 1])."""
    return torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1), torch.cat([key_pos, next_pos], dim=1)


def with_mask(mask: torch.Tensor, _layer: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A decoder layer's forward pre-hook that gives it ``mask`` as its attention mask."""
    return args, {**kwargs, "attention_mask": mask}


def decode_masks(
    adapter: DecoderAdapter,
    cache: DynamicCache,
    probe: torch.Tensor,
    query_pos: torch.Tensor,
    key_pos: torch.Tensor,
    key_mask: torch.Tensor,
) -> torch.Tensor | dict[str, torch.Tensor]:
    """The attention mask(s) of one decode step from the cache columns' true positions ``key_pos`` and validity
    ``key_mask`` [B, K + L] (the new token's column included) and the query positions ``query_pos`` [B, 1].

    Removal leaves gaps in the positions, so causality and windows are decided by position, never by index
    (docs/adapters.md "Masks"); sliding layers hold only the last columns, and get the last (stored + 1) of them.
    """
    stored = stored_lengths(cache, adapter.layer_types)
    widths = {SLIDING: stored[SLIDING] + 1} if SLIDING in stored else None
    return adapter.masks(probe, query_pos, key_pos, key_mask, widths)
