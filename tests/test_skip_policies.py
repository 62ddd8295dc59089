"""Skip policies split the visual tokens as docs/method.md "Policies" says; encoders give the paper's [CLS] attention
scores without materialising the attention map."""

from __future__ import annotations

import pytest
import timm
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from skipvision.encoders.hf_vision import TINY_TOWER
from skipvision.encoders.timm_encoder import TINY_VIT
from skipvision.registry import ENCODERS, SKIP_POLICIES
from skipvision.skip.policies.attention_score import AttentionScorePolicy
from skipvision.skip.policies.base import TokenSplit
from skipvision.skip.policies.none import NoSkip
from skipvision.skip.policies.router import RouterPolicy
from skipvision.skip.policies.uniform import UniformPolicy


def assert_partition(split: TokenSplit, batch: int, num_tokens: int, num_retained: int) -> None:
    """R and C are sorted, disjoint, of the right sizes, and together cover every token of every image."""
    assert split.retained.shape == (batch, num_retained)
    assert split.candidates.shape == (batch, num_tokens - num_retained)
    for part in (split.retained, split.candidates):
        assert part.dtype == torch.long
        assert bool((part[:, 1:] > part[:, :-1]).all())
    both = torch.cat([split.retained, split.candidates], dim=1).sort(dim=1).values  # [B, N]
    assert torch.equal(both, torch.arange(num_tokens).expand(batch, -1))


@pytest.mark.parametrize("name", SKIP_POLICIES.names())
def test_every_policy_builds_from_its_tiny_spec_and_partitions_the_tokens(name: str) -> None:
    torch.manual_seed(0)
    policy = SKIP_POLICIES.build(SKIP_POLICIES.tiny_spec(name), optional={"dim": 8, "num_layers": 2})
    features, cls_scores = torch.randn(2, 6, 8), torch.rand(2, 6)
    for scores in (cls_scores, None):
        split = policy.split(features, scores)
        assert_partition(split, 2, 6, 2 if policy.layout(6, None, False).skips else 6)


def test_uniform_spreads_the_retained_tokens_evenly() -> None:
    split = UniformPolicy(num_retained=4).split(torch.randn(3, 16, 2))
    assert split.retained.tolist() == [[0, 5, 10, 15]] * 3
    assert_partition(split, 3, 16, 4)
    assert UniformPolicy(num_retained=5).split(torch.randn(1, 12, 2)).retained.tolist() == [[0, 3, 6, 8, 11]]
    assert UniformPolicy(num_retained=1).split(torch.randn(1, 5, 2)).retained.tolist() == [[0]]


def test_attention_score_retains_the_top_cls_scores_in_raster_order() -> None:
    cls_scores = torch.tensor([[0.1, 0.5, 0.0, 0.2, 0.4, 0.0, 0.9, 0.3], [0.8, 0.0, 0.1, 0.7, 0.0, 0.0, 0.2, 0.9]])
    split = AttentionScorePolicy(num_retained=3).split(torch.randn(2, 8, 4), cls_scores)
    assert split.retained.tolist() == [[1, 4, 6], [0, 3, 7]]
    assert split.candidates.tolist() == [[0, 2, 3, 5, 7], [1, 2, 4, 5, 6]]
    assert split.scores is cls_scores


def test_attention_score_falls_back_to_similarity_with_the_mean_token() -> None:
    """Tokens 2 and 4 point along the mean token; the others are 45 degrees off it."""
    features = torch.tensor(
        [[1.0, 1, 0, 0], [1, -1, 0, 0], [1, 0, 0, 0], [1, 0, 1, 0], [1, 0, 0, 0], [1, 0, -1, 0]]
    ).expand(2, -1, -1)  # [2, 6, 4], mean token (1, 0, 0, 0)
    split = AttentionScorePolicy(num_retained=2).split(features, None)
    assert split.retained.tolist() == [[2, 4], [2, 4]]
    torch.testing.assert_close(split.scores[0], torch.tensor([2**-0.5, 2**-0.5, 1, 2**-0.5, 1, 2**-0.5]))


def test_attention_score_without_cls_scores_can_refuse() -> None:
    policy = AttentionScorePolicy(num_retained=2, fallback="error")
    with pytest.raises(ValueError, match=r"no \[CLS\] token \(e.g. a CNN or SigLIP\)"):
        policy.split(torch.randn(1, 6, 4), None)
    assert policy.split(torch.randn(1, 6, 4), torch.rand(1, 6)).retained.shape == (1, 2)
    with pytest.raises(ValueError, match="fallback must be one of mean_similarity, error"):
        AttentionScorePolicy(num_retained=2, fallback="random")
    with pytest.raises(ValueError, match=r"cls_scores \(1, 5\) do not match features \(1, 6, 4\)"):
        policy.split(torch.randn(1, 6, 4), torch.rand(1, 5))


def test_none_keeps_every_token() -> None:
    split = NoSkip().split(torch.randn(2, 7, 3))
    assert split.retained.tolist() == [list(range(7))] * 2
    assert split.candidates.shape == (2, 0)


def test_size_arguments() -> None:
    for kwargs in ({}, {"num_retained": 2, "retain_ratio": 0.5}):
        with pytest.raises(ValueError, match="exactly one of num_retained or retain_ratio"):
            UniformPolicy(**kwargs)
    with pytest.raises(ValueError, match="retain_ratio must be in"):
        UniformPolicy(retain_ratio=1.5)
    assert UniformPolicy(retain_ratio=0.3).num_retained_for(16) == 5  # round(4.8)
    assert UniformPolicy(retain_ratio=0.01).num_retained_for(16) == 1  # at least one
    assert UniformPolicy(retain_ratio=0.3).split(torch.randn(1, 16, 2)).retained.shape == (1, 5)
    with pytest.raises(ValueError, match="num_retained=7 exceeds the 6 visual tokens"):
        AttentionScorePolicy(num_retained=7).split(torch.randn(1, 6, 4), torch.rand(1, 6))


def test_token_split_from_mask_and_indices() -> None:
    keep = torch.tensor([[True, False, True, False], [False, True, True, False]])
    split = TokenSplit.from_mask(keep)
    assert split.retained.tolist() == [[0, 2], [1, 2]] and split.candidates.tolist() == [[1, 3], [0, 3]]
    split = TokenSplit.from_indices(torch.tensor([[3, 0], [2, 1]]), 4)
    assert split.retained.tolist() == [[0, 3], [1, 2]] and split.candidates.tolist() == [[1, 2], [0, 3]]
    with pytest.raises(ValueError, match=r"same number of tokens in every row, got \[2, 1\]"):
        TokenSplit.from_mask(torch.tensor([[True, True], [True, False]]))


# --- encoder [CLS] attention scores ----------------------------------------------------------------------------


@pytest.mark.parametrize("qk_norm", [False, True])
def test_timm_cls_scores_equal_the_materialised_attention(qk_norm: bool) -> None:
    torch.manual_seed(0)
    kwargs = {**TINY_VIT["model_kwargs"], "qk_norm": qk_norm}
    full = timm.create_model(TINY_VIT["model_name"], img_size=32, num_classes=0, **kwargs).eval()
    for param in full.parameters():  # non-trivial norms and biases, so a wrong one shows
        param.data.add_(0.1 * torch.randn_like(param))
    enc = ENCODERS.build({**ENCODERS.tiny_spec("timm"), "model_kwargs": kwargs}).eval()
    enc.model.load_state_dict(full.state_dict(), strict=False)
    feature_attn = full.blocks[1].attn  # feature_layer -2 of 3 blocks
    feature_attn.fused_attn = False  # eager math, so the full [B, H, T, T] map passes through attn_drop
    maps = []
    feature_attn.attn_drop.register_forward_hook(lambda _m, _args, out: maps.append(out))
    x = torch.randn(2, 3, 32, 32)
    full.forward_features(x)
    reference = maps[0][:, :, 0, 1:].sum(dim=1)  # [B, N]: the [CLS] row, patch keys, summed over heads

    feats, scores = enc.forward_with_cls_attention(x)
    assert enc.has_cls and scores.shape == (2, 16)
    torch.testing.assert_close(scores, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(feats, enc(x))
    heads = feature_attn.num_heads
    assert bool((scores > 0).all()) and bool((scores.sum(dim=1) < heads).all())  # the CLS key holds the rest
    assert not enc.model.blocks[-1]._forward_pre_hooks  # the capture hook is gone


def test_hf_clip_cls_scores_equal_the_eager_attentions() -> None:
    torch.manual_seed(0)
    tower = CLIPVisionModel(CLIPVisionConfig(**TINY_TOWER["config"], attn_implementation="eager")).eval()
    enc = ENCODERS.build(ENCODERS.tiny_spec("hf_clip")).eval()  # sdpa, layers after the feature layer removed
    enc.tower.load_state_dict(tower.state_dict(), strict=False)
    x = torch.randn(2, 3, 32, 32)
    attentions = tower(pixel_values=x, output_attentions=True).attentions
    reference = attentions[1][:, :, 0, 1:].sum(dim=1)  # [B, N], feature layer -2 of 3

    feats, scores = enc.forward_with_cls_attention(x)
    assert enc.has_cls and len(attentions) == 3
    torch.testing.assert_close(scores, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(feats, enc(x))
    assert bool((scores > 0).all()) and bool((scores.sum(dim=1) < tower.config.num_attention_heads).all())


@pytest.mark.parametrize(
    "spec",
    [
        ENCODERS.tiny_spec("hf_siglip"),
        {"name": "timm", "model_name": "resnet10t", "img_size": 32, "feature_layer": 2},
    ],
    ids=["siglip", "resnet10t"],
)
def test_encoders_without_cls_give_no_scores(spec: dict) -> None:
    enc = ENCODERS.build(spec).eval()
    x = torch.randn(1, 3, *enc.image_size)
    feats, scores = enc.forward_with_cls_attention(x)
    assert not enc.has_cls and scores is None
    torch.testing.assert_close(feats, enc(x))


# --- router ----------------------------------------------------------------------------------------------------


def test_router_gets_gradient_through_the_value_preserving_gate() -> None:
    torch.manual_seed(0)
    router = RouterPolicy(dim=8, num_retained=3)
    features = torch.randn(2, 6, 8)
    split = router.split(features)
    weighted = router.weight_retained(features, split)  # [2, 6, 8]
    assert torch.equal(weighted, features)
    (weighted * torch.randn_like(weighted)).sum().backward()  # a downstream loss, no aux loss
    scorer = router.scorer[1]
    assert scorer.weight.grad is not None and scorer.weight.grad.abs().sum() > 0
    assert torch.equal(split.scores.detach().topk(3).indices.sort().values, split.retained)


def test_router_aux_loss_falls_and_aligns_the_zero_threshold_with_top_k() -> None:
    torch.manual_seed(0)
    router = RouterPolicy(dim=16, num_retained=4)
    features = torch.randn(8, 16, 16)
    optimizer = torch.optim.Adam(router.parameters(), lr=0.1)
    losses = []
    for _ in range(30):
        split = router.split(features)
        losses.append(split.aux_loss.item())
        optimizer.zero_grad()
        split.aux_loss.backward()
        optimizer.step()
    assert losses[0] > 0 and losses[-1] < 0.2 * losses[0]
    split = router.split(features)
    selected = torch.zeros(8, 16, dtype=torch.bool).scatter(1, split.retained, True)  # [8, 16]
    rows_agree = ((split.scores > 0) == selected).all(dim=1)  # [8]
    assert rows_agree.float().mean() >= 0.75
