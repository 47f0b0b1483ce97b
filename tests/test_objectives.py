"""Loss values on hand-made distributions, and the baselines' open-unlearning definitions."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from train.objectives import (
    IGNORE_INDEX,
    grad_ascent_loss,
    grad_diff_loss,
    inverted_hinge_loss,
    masked_mean,
    nll_loss,
    npo_forget_loss,
    npo_loss,
    orthogonality_loss,
    sequence_nll,
    token_nll,
)


def _sequence(distributions: list[list[float]], targets: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [1, n+1, V] whose position t has the given distribution, labels [1, n+1] predicting targets."""
    probs = torch.tensor(distributions + [distributions[-1]])
    logits = probs.log().unsqueeze(0)
    labels = torch.tensor([[IGNORE_INDEX] + targets])
    return logits, labels


def test_inverted_hinge_loss_hand_values() -> None:
    dist = [0.5, 0.3, 0.2]
    for target, expected in [(0, 1 + 0.5 - 0.3), (1, 1 + 0.3 - 0.5), (2, 1 + 0.2 - 0.5)]:
        logits, labels = _sequence([dist], [target])
        assert inverted_hinge_loss(logits, labels).item() == pytest.approx(expected, abs=1e-6)
    # Mean over tokens: 1.2 and 0.7.
    logits, labels = _sequence([dist, dist], [0, 2])
    assert inverted_hinge_loss(logits, labels).item() == pytest.approx((1.2 + 0.7) / 2, abs=1e-6)


def test_inverted_hinge_loss_bounds() -> None:
    # Fully forgotten: the target has ~0 mass and a rival all of it → 0.
    logits, labels = _sequence([[1e-9, 1 - 2e-9, 1e-9]], [0])
    assert inverted_hinge_loss(logits, labels).item() == pytest.approx(0.0, abs=1e-6)
    # Fully memorised: the target has all the mass → 2.
    logits, labels = _sequence([[1 - 2e-9, 1e-9, 1e-9]], [0])
    assert inverted_hinge_loss(logits, labels).item() == pytest.approx(2.0, abs=1e-6)


def test_inverted_hinge_loss_respects_mask_and_ignore_index() -> None:
    logits, labels = _sequence([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]], [0, 2])
    only_second = torch.tensor([[False, True]])
    assert inverted_hinge_loss(logits, labels, only_second).item() == pytest.approx(1 + 0.8 - 0.1, abs=1e-6)
    labels[0, 2] = IGNORE_INDEX
    assert inverted_hinge_loss(logits, labels).item() == pytest.approx(1.2, abs=1e-6)


def test_inverted_hinge_gradient_lowers_target_and_raises_rival() -> None:
    logits, labels = _sequence([[0.5, 0.3, 0.2]], [0])
    logits.requires_grad_(True)
    inverted_hinge_loss(logits, labels).backward()
    grad = logits.grad[0, 0]
    assert grad[0] > 0 and grad[1] < 0  # descent lowers the target's logit, raises the rival's


def test_nll_matches_huggingface_causal_lm_loss() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11)
    labels = torch.randint(0, 11, (2, 6))
    labels[:, :2] = IGNORE_INDEX
    labels[1, 5] = IGNORE_INDEX
    reference = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
    assert nll_loss(logits, labels).item() == pytest.approx(reference.item(), abs=1e-6)
    nll, valid = token_nll(logits, labels)
    assert valid.sum() == 7  # shifted labels: 4 in row 0, 3 in row 1
    assert sequence_nll(logits, labels).tolist() == pytest.approx((nll * valid).sum(-1).tolist(), abs=1e-6)


def test_nll_hand_value_and_mask() -> None:
    logits, labels = _sequence([[0.5, 0.5], [0.25, 0.75]], [0, 1])
    assert nll_loss(logits, labels).item() == pytest.approx((math.log(2) + math.log(4 / 3)) / 2, abs=1e-6)
    assert nll_loss(logits, labels, torch.tensor([[False, True]])).item() == pytest.approx(math.log(4 / 3), abs=1e-6)


def test_empty_mask_gives_zero_loss_with_zero_gradient() -> None:
    logits, labels = _sequence([[0.5, 0.5]], [0])
    logits.requires_grad_(True)
    loss = inverted_hinge_loss(logits, labels, torch.tensor([[False]]))
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(logits.grad) == 0
    assert masked_mean(torch.ones(3), torch.zeros(3, dtype=torch.bool)).item() == 0.0


def test_grad_ascent_and_grad_diff() -> None:
    torch.manual_seed(1)
    f_logits, r_logits = torch.randn(2, 5, 7), torch.randn(3, 4, 7)
    f_labels, r_labels = torch.randint(0, 7, (2, 5)), torch.randint(0, 7, (3, 4))
    f, r = nll_loss(f_logits, f_labels).item(), nll_loss(r_logits, r_labels).item()
    assert grad_ascent_loss(f_logits, f_labels).item() == pytest.approx(-f, abs=1e-6)
    got = grad_diff_loss(f_logits, f_labels, r_logits, r_labels, gamma=0.5, alpha=2.0).item()
    assert got == pytest.approx(-0.5 * f + 2.0 * r, abs=1e-5)


def test_npo_values() -> None:
    torch.manual_seed(2)
    logits = torch.randn(2, 5, 7)
    labels = torch.randint(0, 7, (2, 5))
    beta = 0.1
    # Model equal to the reference: log ratio 0 → −(2/β) log σ(0) = (2/β) ln 2.
    assert npo_forget_loss(logits, logits, labels, beta).item() == pytest.approx(2 / beta * math.log(2), rel=1e-6)
    # A reference that is more confident by Δ nats per sequence: ratio −Δ, loss −(2/β) log σ(βΔ).
    ref = logits.clone()
    delta = sequence_nll(logits, labels) - sequence_nll(ref * 1.5, labels)
    expected = (-(2 / beta) * F.logsigmoid(beta * delta)).mean().item()
    assert npo_forget_loss(logits, ref * 1.5, labels, beta).item() == pytest.approx(expected, rel=1e-5)
    r_logits, r_labels = torch.randn(1, 4, 7), torch.randint(0, 7, (1, 4))
    total = npo_loss(logits, ref * 1.5, labels, r_logits, r_labels, beta, gamma=1.0, alpha=1.0).item()
    assert total == pytest.approx(expected + nll_loss(r_logits, r_labels).item(), rel=1e-5)


def test_npo_gradient_skips_the_reference() -> None:
    logits = torch.randn(1, 4, 5, requires_grad=True)
    ref = torch.randn(1, 4, 5, requires_grad=True)
    npo_forget_loss(logits, ref, torch.randint(0, 5, (1, 4))).backward()
    assert logits.grad is not None and ref.grad is None


def test_orthogonality_loss_values_and_isolation() -> None:
    out, rank = 16, 4
    q, _ = torch.linalg.qr(torch.randn(out, 3 * rank))
    stacked = torch.stack([q[:, :rank], q[:, rank: 2 * rank], q[:, :rank]], dim=1)  # [out, 3, r]
    assert orthogonality_loss([stacked], head=0, others=[1]).item() == pytest.approx(0.0, abs=1e-6)
    assert orthogonality_loss([stacked], head=0, others=[2]).item() == pytest.approx(1 / rank, abs=1e-6)
    assert orthogonality_loss([stacked], head=0, others=[]).item() == 0.0
    # Scale-free: multiplying a head does not change it.
    assert orthogonality_loss([stacked * 7], head=0, others=[2]).item() == pytest.approx(1 / rank, abs=1e-6)
    param = stacked.clone().requires_grad_(True)
    orthogonality_loss([param], head=0, others=[1, 2]).backward()
    assert torch.count_nonzero(param.grad[:, 1:]) == 0 and torch.count_nonzero(param.grad[:, 0]) > 0


def test_orthogonality_loss_is_the_mean_of_per_layer_terms_over_layers_of_several_shapes() -> None:
    torch.manual_seed(0)
    layers = [torch.randn(out, 3, 4) for out in (16, 32, 16, 8, 32)]

    def one_layer(b: torch.Tensor, head: int, others: list[int]) -> float:
        own, rest = b[:, head], b[:, others]
        terms = [(own.T @ rest[:, j]).pow(2).sum() / (own.pow(2).sum() * rest[:, j].pow(2).sum()) for j in range(len(others))]
        return float(torch.stack(terms).mean())

    expected = sum(one_layer(b, 1, [0, 2]) for b in layers) / len(layers)
    assert orthogonality_loss(layers, head=1, others=[0, 2]).item() == pytest.approx(expected, rel=1e-5)


# ---- the forget objectives beyond the paper -----------------------------------------------------------

def _logits_and_labels(seed: int = 0):
    torch.manual_seed(seed)
    logits = torch.randn(3, 6, 11, requires_grad=True)
    labels = torch.randint(0, 11, (3, 6))
    labels[:, :2] = IGNORE_INDEX
    return logits, labels


def test_bounded_nll_ascent_pushes_only_answers_below_the_target():
    from train.objectives import bounded_nll_ascent, sequence_mean_nll

    logits, labels = _logits_and_labels()
    mean_nll, has = sequence_mean_nll(logits, labels)
    # A target strictly between the sequences' NLLs: the ones above it get exactly zero gradient.
    ordered = mean_nll.detach().sort().values
    target = float((ordered[0] + ordered[1]) / 2)
    loss = bounded_nll_ascent(logits, labels, None, target)
    loss.backward()
    expected = torch.clamp(target - mean_nll, min=0).mean()
    torch.testing.assert_close(loss, expected)
    for row in range(3):
        above = bool(mean_nll[row] > target)
        assert bool((logits.grad[row] == 0).all()) == above
    # Below the target the gradient is gradient ascent on that sequence's mean NLL.
    row = int(mean_nll.argmin())
    ascent = torch.autograd.grad(-mean_nll[row] / 3, logits, retain_graph=True)[0][row]
    torch.testing.assert_close(logits.grad[row], ascent)


def test_bounded_nll_ascent_is_zero_once_every_answer_reached_the_target():
    from train.objectives import bounded_nll_ascent

    logits, labels = _logits_and_labels(1)
    assert float(bounded_nll_ascent(logits, labels, None, target=0.0)) == 0.0


def test_distribution_kl_is_zero_for_the_teacher_itself_and_positive_otherwise():
    from train.objectives import distribution_kl

    logits, labels = _logits_and_labels(2)
    assert float(distribution_kl(logits, logits.detach(), labels)) == pytest.approx(0.0, abs=1e-6)
    other = torch.randn_like(logits)
    kl = distribution_kl(logits, other, labels)
    assert float(kl) > 0
    kl.backward()
    assert logits.grad.abs().sum() > 0
    # Only labelled (shifted) positions count: changing the logits at an unlabelled one changes nothing.
    shifted = logits.detach().clone()
    shifted[:, 0] += 5.0
    torch.testing.assert_close(distribution_kl(shifted, other, labels), kl.detach())


def test_answer_mask_without_eos_drops_each_rows_last_labelled_token():
    from train.alter.alter_steps import answer_mask_without_eos

    labels = torch.tensor([[-100, -100, 5, 6, 2, -100], [-100, 7, 8, 9, 10, 2]])
    mask = answer_mask_without_eos(labels)
    assert mask.tolist() == [[False, True, True, False, False], [True, True, True, True, False]]
