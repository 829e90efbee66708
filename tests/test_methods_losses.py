"""Pure losses of the baseline methods, each checked against a direct, loop-by-loop computation."""

import math

import pytest
import torch

from ctxdistill.losses import chunked_kl, distill_with_ce, ft_kl_loss, masked_kl_loss, talr_dynamic_tau, talr_loss


def direct_kl(t_row, s_row, temperature):
    """Σ_v p_t(v) (log p_t(v) - log p_s(v)) at temperature T, times T², for one position."""
    p = torch.softmax(t_row.double() / temperature, -1)
    log_p = torch.log_softmax(t_row.double() / temperature, -1)
    log_q = torch.log_softmax(s_row.double() / temperature, -1)
    return float((p * (log_p - log_q)).sum()) * temperature**2


def direct_nll(logits_row, token):
    return -float(torch.log_softmax(logits_row.double(), -1)[token])


@pytest.fixture()
def batch():
    torch.manual_seed(0)
    student = torch.randn(2, 6, 11)
    teacher = torch.randn(2, 6, 11)
    labels = torch.randint(0, 11, (2, 6))
    labels[1, 4:] = -100  # padding of the second sequence
    return student, teacher, labels


def test_ft_kl_is_ce_plus_beta_times_mean_kl_on_labelled_positions(batch):
    student, teacher, labels = batch
    total, ce, kl = ft_kl_loss(student, teacher, labels, beta=0.1, temperature=1.5)
    positions = [(b, t) for b in range(2) for t in range(5) if labels[b, t + 1] != -100]
    want_ce = sum(direct_nll(student[b, t], labels[b, t + 1]) for b, t in positions) / len(positions)
    want_kl = sum(direct_kl(teacher[b, t], student[b, t], 1.5) for b, t in positions) / len(positions)
    assert len(positions) == 8
    assert ce.item() == pytest.approx(want_ce, rel=1e-5)
    assert kl.item() == pytest.approx(want_kl, rel=1e-5)
    assert total.item() == pytest.approx(want_ce + 0.1 * want_kl, rel=1e-5)


def test_ft_kl_with_the_teacher_equal_to_the_student_is_plain_ce(batch):
    student, _, labels = batch
    total, ce, kl = ft_kl_loss(student, student.clone(), labels, beta=0.1)
    assert kl.item() == pytest.approx(0.0, abs=1e-6)
    assert total.item() == pytest.approx(ce.item(), rel=1e-6)


def test_talr_weights_tokens_by_clamped_probability_power_with_median_tau():
    torch.manual_seed(1)
    logits = torch.randn(3, 5, 7) * 3
    labels = torch.randint(0, 7, (3, 5))
    labels[2, 3:] = -100
    loss, tau = talr_loss(logits, labels, floor=0.01)
    nll = {(b, t): direct_nll(logits[b, t], labels[b, t + 1]) for b in range(3) for t in range(4) if labels[b, t + 1] != -100}
    per_sequence = [sum(v for (b, _), v in nll.items() if b == seq) / sum(1 for (b, _) in nll if b == seq) for seq in range(3)]
    want_tau = sorted(per_sequence)[1]  # the median of three
    assert tau == pytest.approx(want_tau, rel=1e-5)
    weights = {k: max(math.exp(-v) ** (1 / want_tau), 0.01) for k, v in nll.items()}
    want = sum(weights[k] * nll[k] for k in nll) / len(nll)
    assert loss.item() == pytest.approx(want, rel=1e-4)
    assert talr_dynamic_tau(*_logp_valid(logits, labels)) == pytest.approx(want_tau, rel=1e-5)


def _logp_valid(logits, labels):
    from ctxdistill.losses import token_logprobs

    return token_logprobs(logits, labels)


def test_talr_fixed_tau_and_floor_and_stop_gradient():
    torch.manual_seed(2)
    logits = (torch.randn(1, 6, 9) * 4).requires_grad_()
    labels = torch.randint(0, 9, (1, 6))
    labels[0, 1:4] = logits.detach()[0, :3].argmax(-1)  # likely tokens: weights above the floor
    loss, tau = talr_loss(logits, labels, tau=0.5, floor=0.2)
    assert tau == 0.5
    loss.backward()
    # the gradient is that of Σ w·NLL / N with w held constant (stop-gradient on the weights)
    logp = torch.log_softmax(logits.detach()[:, :-1].double(), -1).gather(-1, labels[:, 1:, None])[..., 0]
    w = (logp.exp() ** 2).clamp_min(0.2)  # p^(1/0.5), floored at 0.2
    assert (w == 0.2).any() and (w > 0.2).any(), "the example must exercise the floor"
    ref_logits = logits.detach().clone().requires_grad_()
    ref_logp = torch.log_softmax(ref_logits[:, :-1].double(), -1).gather(-1, labels[:, 1:, None])[..., 0]
    (w * -ref_logp).mean().backward()
    torch.testing.assert_close(logits.grad, ref_logits.grad.float(), rtol=1e-4, atol=1e-6)


def test_chunked_kl_follows_the_authors_chunk_sums_or_the_plain_mean():
    per_position = torch.arange(130, dtype=torch.float32)
    want = (per_position[:64].sum() + per_position[64:128].sum() + per_position[128:].sum()) / 3
    assert chunked_kl(per_position, 64, "chunk_sum").item() == pytest.approx(want.item())
    assert chunked_kl(per_position, 64, "mean").item() == pytest.approx(per_position.mean().item())
    assert chunked_kl(per_position[:10], 64, "chunk_sum").item() == pytest.approx(per_position[:10].sum().item())


def test_masked_kl_and_distill_with_ce_against_direct_computation():
    torch.manual_seed(3)
    teacher, student = torch.randn(5, 13), torch.randn(5, 13)
    mask = torch.tensor([True, False, True, True, False])
    targets = torch.randint(0, 13, (5,))
    kept = [0, 2, 3]
    want_kl = sum(direct_kl(teacher[i], student[i], 2.0) for i in kept) / 3
    assert masked_kl_loss(teacher, student, mask, 2.0).item() == pytest.approx(want_kl, rel=1e-5)
    total, kl, ce = distill_with_ce(teacher, student, mask, targets, temperature=2.0, ce_weight=0.5)
    want_ce = sum(direct_nll(student[i], targets[i]) for i in kept) / 3
    assert kl.item() == pytest.approx(want_kl, rel=1e-5)
    assert ce.item() == pytest.approx(want_ce, rel=1e-5)
    assert total.item() == pytest.approx(want_kl + 0.5 * want_ce, rel=1e-5)
