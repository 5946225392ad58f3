"""The DSpark training objective (paper §3.3) against hand computation."""

import math

import pytest
import torch

from dspark_hf.training.losses import (
    DSparkMetricAccumulator,
    dspark_loss,
    expected_acceptance_length,
    total_variation,
)


def _softmax(values):
    exps = [math.exp(v) for v in values]
    return [e / sum(exps) for e in exps]


def test_loss_terms_match_hand_computation():
    # One block, γ = 2, vocabulary of 3.
    draft = [[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]]
    target = [[0.0, 1.0, 0.0], [2.0, 0.0, 0.0]]
    labels = [1, 0]
    conf = [0.3, -0.7]
    g = 2.0
    result = dspark_loss(
        torch.tensor([draft]),
        torch.tensor([target]),
        torch.tensor([labels]),
        torch.tensor([[True, True]]),
        torch.tensor([conf]),
        ce_weight=0.1,
        tv_weight=0.9,
        confidence_weight=1.0,
        position_decay=g,
    )
    w = [1.0, math.exp(-1.0 / g)]
    ce = [-math.log(_softmax(d)[y]) for d, y in zip(draft, labels, strict=True)]
    tv = [
        0.5 * sum(abs(a - b) for a, b in zip(_softmax(d), _softmax(t), strict=True))
        for d, t in zip(draft, target, strict=True)
    ]
    c_star = [1.0 - v for v in tv]
    sig = [1.0 / (1.0 + math.exp(-x)) for x in conf]
    bce = [-(cs * math.log(s) + (1 - cs) * math.log(1 - s)) for cs, s in zip(c_star, sig, strict=True)]

    def wmean(values):
        return sum(wk * v for wk, v in zip(w, values, strict=True)) / sum(w)

    assert result.ce_loss.item() == pytest.approx(wmean(ce), rel=1e-5)
    assert result.tv_loss.item() == pytest.approx(wmean(tv), rel=1e-5)
    assert result.confidence_loss.item() == pytest.approx(wmean(bce), rel=1e-5)
    total = 0.1 * wmean(ce) + 0.9 * wmean(tv) + 1.0 * wmean(bce)
    assert result.loss.item() == pytest.approx(total, rel=1e-5)

    metrics = result.metrics
    assert metrics["ce"] == pytest.approx(sum(ce) / 2, rel=1e-5)
    assert metrics["tv"] == pytest.approx(sum(tv) / 2, rel=1e-5)
    assert metrics["confidence_error"] == pytest.approx(
        sum(abs(s - c) for s, c in zip(sig, c_star, strict=True)) / 2, rel=1e-5
    )
    assert metrics["acceptance_1"] == pytest.approx(c_star[0], rel=1e-5)
    assert metrics["acceptance_2"] == pytest.approx(c_star[1], rel=1e-5)
    tau = 1 + c_star[0] + c_star[0] * c_star[1]
    assert metrics["expected_tau"] == pytest.approx(tau, rel=1e-5)


def test_tv_is_zero_when_draft_equals_target():
    logits = torch.randn(2, 3, 4, 17)
    assert torch.allclose(total_variation(logits, logits), torch.zeros(2, 3, 4), atol=1e-6)
    result = dspark_loss(
        logits, logits.clone(), torch.zeros(2, 3, 4, dtype=torch.long), torch.ones(2, 3, 4, dtype=torch.bool)
    )
    assert result.tv_loss.item() == pytest.approx(0.0, abs=1e-6)
    assert result.metrics["expected_tau"] == pytest.approx(1 + 4, abs=1e-5)
    assert result.metrics["acceptance_3"] == pytest.approx(1.0, abs=1e-6)
    assert "confidence_error" not in result.metrics  # no confidence head
    assert result.confidence_loss.item() == 0.0


def test_tv_bounds_and_disjoint_supports():
    a = torch.tensor([[10.0, -10.0]])
    b = torch.tensor([[-10.0, 10.0]])
    assert total_variation(a, b).item() == pytest.approx(1.0, abs=1e-6)
    tv = total_variation(torch.randn(50, 9), torch.randn(50, 9))
    assert (tv >= 0).all() and (tv <= 1).all()


def test_invalid_positions_do_not_contribute():
    torch.manual_seed(0)
    draft = torch.randn(1, 2, 3, 11, requires_grad=True)
    target = torch.randn(1, 2, 3, 11)
    labels = torch.randint(0, 11, (1, 2, 3))
    valid = torch.tensor([[[True, True, False], [True, False, False]]])
    conf = torch.randn(1, 2, 3, requires_grad=True)
    result = dspark_loss(draft, target, labels, valid, conf)
    result.loss.backward()
    assert torch.all(draft.grad[~valid] == 0)
    assert torch.all(conf.grad[~valid] == 0)
    assert draft.grad[valid].abs().sum() > 0
    # Changing anything at invalid positions leaves the loss unchanged.
    draft2 = draft.detach().clone()
    draft2[~valid] = 100.0
    labels2 = labels.clone()
    labels2[~valid] = 7
    again = dspark_loss(draft2, target, labels2, valid, conf.detach())
    assert again.loss.item() == pytest.approx(result.loss.item(), rel=1e-6)
    assert result.num_positions.item() == 3
    assert result.acceptance_count.tolist() == [2.0, 1.0, 0.0]
    assert result.num_full_blocks.item() == 0
    assert "expected_tau" not in result.metrics


def test_confidence_target_is_detached_and_target_gets_no_gradient():
    torch.manual_seed(1)
    draft = torch.randn(1, 1, 2, 5, requires_grad=True)
    target = torch.randn(1, 1, 2, 5, requires_grad=True)
    conf = torch.randn(1, 1, 2, requires_grad=True)
    result = dspark_loss(
        draft,
        target,
        torch.zeros(1, 1, 2, dtype=torch.long),
        torch.ones(1, 1, 2, dtype=torch.bool),
        conf,
        ce_weight=0.0,
        tv_weight=0.0,
        confidence_weight=1.0,
    )
    result.loss.backward()
    assert target.grad is None
    assert draft.grad is None or torch.all(draft.grad == 0)  # c* = 1 − TV is a constant for the BCE
    assert conf.grad.abs().sum() > 0


def test_position_weights_follow_decay():
    # Only the last position has a non-zero CE: the weighted mean is w_γ·ce / Σ w.
    block = 3
    draft = torch.zeros(1, block, 4)
    draft[0, :2, 2] = 50.0  # confident and right at positions 1, 2
    labels = torch.tensor([[2, 2, 2]])
    result = dspark_loss(
        draft, draft.clone(), labels, torch.ones(1, block, dtype=torch.bool), position_decay=1.5
    )
    w = [math.exp(-k / 1.5) for k in range(block)]
    assert result.ce_loss.item() == pytest.approx(w[2] * math.log(4) / sum(w), rel=1e-4)


def test_expected_acceptance_length():
    acc = torch.tensor([[0.5, 0.5, 1.0], [1.0, 1.0, 1.0], [0.0, 1.0, 1.0]])
    assert expected_acceptance_length(acc).tolist() == pytest.approx([1 + 0.5 + 0.25 + 0.25, 4.0, 1.0])


def test_accumulator_equals_concatenated_batch():
    torch.manual_seed(2)
    draft = torch.randn(4, 3, 13)
    target = torch.randn(4, 3, 13)
    labels = torch.randint(0, 13, (4, 3))
    valid = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    conf = torch.randn(4, 3)
    whole = dspark_loss(draft, target, labels, valid, conf)
    accumulator = DSparkMetricAccumulator(block_size=3)
    for part in (slice(0, 1), slice(1, 4)):
        piece = dspark_loss(draft[part], target[part], labels[part], valid[part], conf[part])
        accumulator.add(piece.statistics(), has_confidence=True)
    merged = accumulator.compute()
    for key in (
        "ce",
        "tv",
        "confidence_error",
        "acceptance_1",
        "acceptance_2",
        "acceptance_3",
        "expected_tau",
    ):
        assert merged[key] == pytest.approx(whole.metrics[key], rel=1e-5), key
    accumulator.reset()
    assert not accumulator and accumulator.compute() == {}
