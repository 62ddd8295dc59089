"""Masks from true positions (docs/adapters.md "Masks"): the direct sdpa/eager build equals transformers' builder on
the same rule, for gapped positions (after drops), fillers, left padding and sliding windows; a query that would see
nothing sees everything instead of producing NaN."""

from __future__ import annotations

import pytest
import torch

from skipvision.adapters.masks import builder_mask, direct_mask

from .conftest import tiny_lm_config


def gapped_columns() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Query and key positions [2, 9] with gaps (dropped tokens), left padding in row 0 and a filler in row 1."""
    key = torch.tensor([[0, 0, 0, 1, 4, 5, 9, 10, 11], [0, 1, 2, 5, 6, 7, 8, 12, 13]])
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[0, :2] = False  # left padding (positions clamped to 0)
    valid[1, 4] = False  # a filler
    return key.clone(), key, valid


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("window", [None, 4])
def test_direct_masks_equal_the_builders(implementation: str, window: int | None) -> None:
    config = tiny_lm_config("mistral" if window else "llama", sliding_window=window)
    config._attn_implementation = implementation
    query, key, valid = gapped_columns()
    embeds = torch.zeros(2, query.shape[1], 8)
    built = builder_mask(config, embeds, query, key, valid, window)
    direct = direct_mask(query, key, valid, window, embeds.dtype, implementation)
    assert direct.shape == built.shape == (2, 1, 9, 9) and direct.dtype == built.dtype
    assert torch.equal(direct, built)
    one = direct_mask(query[:, -1:], key, valid, window, embeds.dtype, implementation)  # a decode step's row
    assert torch.equal(one, built[:, :, -1:])


def test_a_query_that_sees_nothing_sees_everything() -> None:
    """Position 0 dropped (an image slot first): the padding query at position 0 has no key at or before it."""
    query = torch.tensor([[0, 3, 4]])
    key, valid = torch.tensor([[0, 3, 4]]), torch.tensor([[False, True, True]])
    mask = direct_mask(query, key, valid, None, torch.float32, "sdpa")[0, 0]  # [3, 3]
    assert mask.tolist() == [[True, True, True], [False, True, False], [False, True, True]]
    scores = torch.randn(1, 1, 3, 4)
    out = torch.nn.functional.scaled_dot_product_attention(scores, scores, scores, attn_mask=mask[None, None])
    assert torch.isfinite(out).all()
