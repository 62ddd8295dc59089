"""Token compressors (C -> S) and summary tokens (docs/method.md "Token pipeline"). Tiny CPU tensors only."""

from __future__ import annotations

import pytest
import torch

from skipvision.compressors.pooling import AvgPool, Identity
from skipvision.compressors.token_merge import TokenMerge, merge_assignment, merge_tokens, plan_merge
from skipvision.registry import COMPRESSORS
from skipvision.skip.summary import SummaryPooling


def twin_tokens() -> torch.Tensor:
    """6 tokens [1, 6, 4]: 1 is a near-duplicate of 0 and 4 of 3, each tilted towards the rest.

    With e_i the unit vectors, cosine redundancies (row sums, zero diagonal) are about 1.50 for tokens 1 and 4,
    1.08 for 0 and 3, and 0.20 for 2 and 5, so merging to 4 tokens makes 1 and 4 the sources, merged into 0 and 3.
    Norms differ on purpose: matching is by cosine, the mean is of the raw features.
    """
    e = torch.eye(4)
    t0 = 2.0 * e[0]
    t1 = 3.0 * (e[0] + 0.1 * (e[1] + e[2] + e[3]))
    t2 = 0.5 * e[1]
    t3 = 1.0 * e[2]
    t4 = 4.0 * (e[2] + 0.1 * (e[0] + e[1] + e[3]))
    t5 = 1.5 * e[3]
    return torch.stack([t0, t1, t2, t3, t4, t5])[None]


def group_sizes(assignment: torch.Tensor, num_out: int) -> torch.Tensor:
    """[B, num_out] number of input tokens assigned to each output slot."""
    return torch.stack([torch.bincount(a, minlength=num_out) for a in assignment])


# --- token merge --------------------------------------------------------------------------------------------


def test_merge_constructed_twins() -> None:
    x = twin_tokens()
    t = x[0]
    plan = plan_merge(x, 4)
    assert plan.destinations.tolist() == [[0, 2, 3, 5]]
    assert plan.assignment.tolist() == [[0, 0, 1, 2, 2, 3]]
    assert torch.equal(merge_assignment(x, 4), plan.assignment)
    expected = torch.stack([(t[0] + t[1]) / 2, t[2], (t[3] + t[4]) / 2, t[5]])[None]
    torch.testing.assert_close(TokenMerge()(x, 4), expected)


def test_merge_properties_random() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 10, 5)
    for num_out in (1, 4, 9):
        plan = plan_merge(x, num_out)
        assert plan.destinations.shape == (3, num_out)
        assert bool((plan.destinations.diff(dim=-1) > 0).all())  # spatial order
        slots = torch.arange(num_out).expand(3, num_out)
        assert torch.equal(plan.assignment.gather(1, plan.destinations), slots)  # destination k -> slot k
        out = merge_tokens(x, num_out)
        assert out.shape == (3, num_out, 5)
        sizes = group_sizes(plan.assignment, num_out)
        assert int(sizes.min()) >= 1 and bool((sizes.sum(-1) == 10).all())
        torch.testing.assert_close((out * sizes[..., None]).sum(1), x.sum(1))  # every group is a plain mean


def test_merge_gradient_is_mean_weight() -> None:
    torch.manual_seed(1)
    x = torch.randn(2, 8, 3, requires_grad=True)
    out = merge_tokens(x, 3)
    assert plan_merge(x, 3).assignment.grad_fn is None  # the matching is not differentiated through
    out.sum().backward()
    assignment = merge_assignment(x, 3)
    sizes = group_sizes(assignment, 3).gather(1, assignment).float()  # [B, n] size of each token's group
    torch.testing.assert_close(x.grad, (1.0 / sizes)[..., None].expand_as(x))


def test_merge_num_out_edges() -> None:
    x = torch.randn(2, 5, 3)
    assert torch.equal(merge_tokens(x, 5), x)
    assert merge_assignment(x, 5).tolist() == [list(range(5))] * 2
    for bad in (0, 6):
        with pytest.raises(ValueError, match=f"got {bad}"):
            merge_tokens(x, bad)


def test_merge_batched_equals_per_sample() -> None:
    torch.manual_seed(2)
    x = torch.randn(4, 9, 6)
    batched, assignment = merge_tokens(x, 4), merge_assignment(x, 4)
    for i in range(4):
        torch.testing.assert_close(batched[i : i + 1], merge_tokens(x[i : i + 1], 4))
        assert torch.equal(assignment[i : i + 1], merge_assignment(x[i : i + 1], 4))


# --- pooling alternatives -----------------------------------------------------------------------------------


def test_avg_pool_windows() -> None:
    x = torch.arange(12.0).view(1, 6, 2)  # token i = [2i, 2i + 1]
    torch.testing.assert_close(AvgPool()(x, 3), torch.tensor([[[1.0, 2.0], [5.0, 6.0], [9.0, 10.0]]]))
    torch.testing.assert_close(AvgPool()(x, 1), x.mean(1, keepdim=True))
    with pytest.raises(ValueError, match="got 7"):
        AvgPool()(x, 7)


def test_identity() -> None:
    x = torch.randn(2, 5, 3)
    assert Identity()(x, 5) is x
    with pytest.raises(ValueError, match=r"all 5 tokens.*got 3"):
        Identity()(x, 3)


@pytest.mark.parametrize("name", COMPRESSORS.names())
def test_registered_compressor_tiny(name: str) -> None:
    compressor = COMPRESSORS.build(COMPRESSORS.tiny_spec(name))
    num_out = 8 if name == "identity" else 3
    assert compressor(torch.randn(2, 8, 4), num_out).shape == (2, num_out, 4)


def test_builtin_compressors_registered() -> None:
    assert {"token_merge", "avg_pool", "identity"} <= set(COMPRESSORS.names())


# --- summary tokens -----------------------------------------------------------------------------------------


def manual_summary(pool: SummaryPooling, group: torch.Tensor) -> torch.Tensor:
    """softmax(Linear(LayerNorm(x))) over the group's tokens, applied to the raw features: [B, D]."""
    scores = torch.nn.functional.linear(
        torch.nn.functional.layer_norm(group, (group.shape[-1],), pool.norm.weight, pool.norm.bias),
        pool.score.weight,
        pool.score.bias,
    )[..., 0]
    return (scores.softmax(-1)[..., None] * group).sum(1)


def test_summary_matches_manual() -> None:
    torch.manual_seed(3)
    pool = SummaryPooling(4)
    group = torch.randn(2, 5, 4)
    torch.testing.assert_close(pool(group), manual_summary(pool, group))
    same = torch.randn(1, 1, 4).expand(1, 3, 4)  # weights sum to 1: a group of equal tokens summarises to it
    torch.testing.assert_close(pool(same), same[:, 0])


def test_summary_mask() -> None:
    torch.manual_seed(4)
    pool = SummaryPooling(4)
    group = torch.randn(2, 5, 4)
    mask = torch.tensor([[True, True, False, True, False], [False] * 5])
    weights = pool.weights(group, mask)
    assert bool((weights[~mask] == 0).all())
    torch.testing.assert_close(weights[0].sum(), torch.tensor(1.0))
    out = pool(group, mask)
    torch.testing.assert_close(out[0], manual_summary(pool, group[:1, mask[0]])[0])
    assert torch.equal(out[1], torch.zeros(4))  # all-masked row: zeros, not NaN
    changed = group.clone()
    changed[~mask] = 100.0 * torch.randn(int((~mask).sum()), 4)
    torch.testing.assert_close(pool(changed, mask), out)


def test_summary_gradients_no_nan() -> None:
    torch.manual_seed(5)
    pool = SummaryPooling(4)
    group = torch.randn(2, 3, 4, requires_grad=True)
    mask = torch.tensor([[True, True, True], [False, False, False]])
    pool(group, mask).sum().backward()
    for grad in (group.grad, pool.norm.weight.grad, pool.score.weight.grad):
        assert grad is not None and bool(torch.isfinite(grad).all())
    assert bool(group.grad[0].abs().sum() > 0) and bool((group.grad[1] == 0).all())
    assert float(pool.score.weight.grad.abs().sum()) > 0


def test_summary_shared_instance_two_groups() -> None:
    torch.manual_seed(6)
    pool = SummaryPooling(4)
    retained, skipped = torch.randn(2, 5, 4), torch.randn(2, 3, 4)
    s_r, s_s = pool(retained), pool(skipped)
    torch.testing.assert_close(s_r, manual_summary(pool, retained))
    torch.testing.assert_close(s_s, manual_summary(pool, skipped))
    assert not torch.allclose(s_r, s_s)
