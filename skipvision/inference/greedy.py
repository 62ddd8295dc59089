"""Batched greedy decoding with the KV cache and explicit position ids (METHOD.md section 4, step 3).

Prompts come left-padded; positions count real tokens only and keep counting from the prompt's true length,
never from the cache length, so the same loop stays correct once a cache holds fewer positions than were seen.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from skipvision.model import VisionLanguageModel, positions_from_mask


@torch.no_grad()
def greedy_generate(
    model: VisionLanguageModel,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    pixel_values: torch.Tensor | None,
    num_images: torch.Tensor | None,
    max_new_tokens: int,
    eos_token_id: int,
) -> list[list[int]]:
    """Generate up to ``max_new_tokens`` per prompt; each returned list stops before its EOS."""
    embedded = model.embed(prompt_ids, pixel_values, num_images)  # embeds [B, P, D]
    mask = prompt_mask  # [B, P]
    positions = positions_from_mask(mask)  # [B, P]
    cache = DynamicCache(config=model.backbone.config)
    out = model.run_backbone(embedded, mask, positions, cache)  # prefill exactly as in training
    batch = prompt_ids.shape[0]
    next_pos = positions[:, -1:] + 1  # [B, 1]
    done = torch.zeros(batch, dtype=torch.bool, device=prompt_ids.device)
    generated: list[list[int]] = [[] for _ in range(batch)]
    for step in range(max_new_tokens):
        token = out.logits[:, -1].argmax(-1)  # [B]
        for row in (~done).nonzero().flatten().tolist():
            if int(token[row]) != eos_token_id:
                generated[row].append(int(token[row]))
        done |= token == eos_token_id
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)  # [B, P+step+1]
        out = model.backbone(
            input_ids=token[:, None], attention_mask=mask, position_ids=next_pos, cache=cache, use_cache=True
        )
        next_pos = next_pos + 1
    return generated
