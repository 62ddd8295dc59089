"""The generation loop: prefill exactly as in training, remove the skipped K/V, decode (METHOD.md section 4).

1. Prefill the whole (left-padded) prompt batch with the cache on and the Skip-FFN plan of training.
2. With ``drop_kv``, remove the skipped slots' keys/values from every layer, per sample (:mod:`.kv`); the 2-D mask
   is pruned the same way. The FastV peer (``prunes_in_llm`` policies) drops its tokens inside the prefill instead.
3. Decode one token at a time over the reduced cache with explicit position ids that continue at each row's true
   position (never from the cache length or the pruned mask), so RoPE phases stay those of the full sequence.

The first generated token comes from the prefill pass and has still seen the skipped tokens. The loop is ours (not
HF ``generate()``, which would derive positions from the pruned cache): greedy or sampling, EOS, stop strings,
``max_new_tokens`` and the model's context length end each row independently.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedTokenizerBase

from skipvision.adapters import SLIDING, DecoderAdapter, adapter_for
from skipvision.errors import SkipvisionError
from skipvision.inference.kv import Removal, drop_cache_positions, kv_cache_bytes, prune_mask, stored_lengths
from skipvision.inference.sampling import GenerationConfig, TokenChooser
from skipvision.model import VisionLanguageModel, positions_from_mask


class PromptTooLongError(SkipvisionError, ValueError):
    """A prompt (image slots included) leaves no room in the model's context."""


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

    @property
    def kept(self) -> torch.Tensor:
        """[B] real (unmasked) cache positions per row after removal."""
        return self.mask.sum(-1)


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock timings cover it (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
    policy = model.visual.policy
    removal: Removal | None = None
    if policy.prunes_in_llm:
        from skipvision.skip.fastv import fastv_prefill

        slots = embedded.visual_slots if embedded.visual_slots is not None else torch.zeros_like(prompt_mask).bool()
        out = fastv_prefill(
            model.backbone, embedded.embeds, prompt_mask, positions, slots, cache, policy.layer, policy.ratio
        )
        logits, kv_bytes, removal = out.logits, out.kv_bytes_before, out.removal
    else:
        try:
            out = model.run_backbone(embedded, prompt_mask, positions, cache, logits_to_keep=1)
        finally:
            if model.skip_ffn is not None:
                model.skip_ffn.set_plan(None)  # decode steps run the plain MLP
        logits, kv_bytes = out.logits[:, -1], kv_cache_bytes(cache)  # [B, V]
        if drop_kv and embedded.ffn_mask is not None:
            removal = Removal.plan(embedded.ffn_mask)  # keep text, R and both summaries; drop S
            drop_cache_positions(cache, removal)
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
    eos_token_id: int | None,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> list[Generation]:
    """Generate for a left-padded prompt batch ``prompt_ids``/``prompt_mask`` [B, P] with its images.

    ``num_images`` [B] says how many of ``pixel_values`` [M, ...] belong to each row, in order (0: text-only).
    Stop strings and texts need ``tokenizer``.
    """
    if config.stop and tokenizer is None:
        raise ValueError("stop strings need a tokenizer to decode the generated text")
    lengths = prompt_mask.sum(-1)  # [B] real prompt lengths
    limit = context_limit(model)
    check_context(lengths.tolist(), limit)
    batch = prompt_ids.shape[0]
    device = prompt_ids.device

    start = time.perf_counter()
    cache = DynamicCache(config=model.backbone.config)
    pre = prefill(model, prompt_ids, prompt_mask, pixel_values, num_images, cache, config.drop_kv)
    chooser = TokenChooser(config, device)
    history = prompt_ids[:, :0]  # [B, 0] generated ids so far
    token = chooser(pre.logits, history)  # [B]
    step_logits = [pre.logits.float()] if config.output_logits else []  # per step [B, V]
    synchronize(device)
    stamps = [time.perf_counter() - start]  # seconds at which each step's token was known

    adapter = adapter_for(model.backbone.config)
    probe = torch.empty(batch, 1, 1, dtype=model.backbone.dtype, device=device)  # the masks' batch, dtype, device
    mask, key_pos = pre.mask, pre.positions  # [B, K] each
    next_pos = positions_from_mask(prompt_mask)[:, -1:] + 1  # [B, 1]
    room = [config.max_new_tokens if limit is None else min(config.max_new_tokens, limit - n) for n in lengths.tolist()]
    generated: list[list[int]] = [[] for _ in range(batch)]
    steps, reasons = [0] * batch, [""] * batch
    texts: list[str | None] = [None] * batch
    while True:
        history = torch.cat([history, token[:, None]], dim=1)  # [B, L]
        for row in range(batch):
            if reasons[row]:
                continue
            steps[row] += 1
            tid = int(token[row])
            if tid == eos_token_id:
                reasons[row] = "eos"
                continue
            generated[row].append(tid)
            if config.stop:
                texts[row] = _cut_at_stop(_decode(tokenizer, generated[row]), config.stop)
                if texts[row] is not None:
                    reasons[row] = "stop"
                    continue
            if steps[row] >= room[row]:
                reasons[row] = "length" if steps[row] >= config.max_new_tokens else "context"
        if all(reasons):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)  # [B, K + L]
        key_pos = torch.cat([key_pos, next_pos], dim=1)  # [B, K + L]
        masks = decode_masks(adapter, cache, probe, next_pos, key_pos, mask)
        out = model.backbone(
            input_ids=token[:, None], attention_mask=masks, position_ids=next_pos, cache=cache, use_cache=True
        )
        next_pos = next_pos + 1
        token = chooser(out.logits[:, -1], history)  # [B]
        if config.output_logits:
            step_logits.append(out.logits[:, -1].float())
        synchronize(device)
        stamps.append(time.perf_counter() - start)

    per_position = kv_cache_bytes(cache) // max(1, batch * cache.get_seq_length())  # bytes per cached position
    results = []
    for row in range(batch):
        n = steps[row]
        decode_ms = (stamps[n - 1] - stamps[0]) * 1000 / (n - 1) if n > 1 else None
        if texts[row] is None and tokenizer is not None:
            texts[row] = _decode(tokenizer, generated[row])
        stats = GenerationStats(
            prompt_tokens=int(lengths[row]),
            generated_tokens=len(generated[row]),
            ttft_ms=stamps[0] * 1000,
            ms_per_token=decode_ms,
            kv_bytes_prefill=per_position * int(lengths[row]),
            kv_bytes_kept=per_position * int(pre.kept[row]),
            finish_reason=reasons[row],
        )
        logits = torch.stack([step[row] for step in step_logits[:n]]) if config.output_logits else None  # [n, V]
        results.append(Generation(generated[row], texts[row], stats, logits))
    return results


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


def _decode(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> str:
    """The answer text: special tokens dropped, and the space the chat template puts after "ASSISTANT:"."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    return text.removeprefix(" ")


def _cut_at_stop(text: str, stops: tuple[str, ...] | list[str]) -> str | None:
    """The text before the earliest stop string, or None when none occurs."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return text[: min(hits)] if hits else None
