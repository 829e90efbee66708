"""Pure losses against direct computations."""

import math

import torch

from ctxdistill.losses import disc_loss, forward_kl_per_position, mean_per_group, token_cross_entropy


def test_forward_kl_equals_direct_full_vocabulary_sum():
    torch.manual_seed(0)
    t, s = torch.randn(5, 50), torch.randn(5, 50)
    for T in (1.0, 2.0):
        p = torch.softmax(t / T, -1)
        direct = (p * (torch.log(p) - torch.log_softmax(s / T, -1))).sum(-1) * T * T
        torch.testing.assert_close(forward_kl_per_position(t, s, T), direct, rtol=1e-5, atol=1e-6)


def test_kl_is_zero_for_identical_logits_and_positive_otherwise():
    x = torch.randn(3, 20)
    assert torch.allclose(forward_kl_per_position(x, x, 2.0), torch.zeros(3), atol=1e-6)
    assert (forward_kl_per_position(x, x.flip(-1), 2.0) > 0).all()


def test_disc_loss_is_mean_over_splits_of_mean_over_positions():
    torch.manual_seed(1)
    t, s = torch.randn(6, 30), torch.randn(6, 30)
    span = torch.tensor([0, 0, 0, 0, 1, 1])  # a 4-position split and a 2-position split
    kl = forward_kl_per_position(t, s, 2.0)
    expected = (kl[:4].mean() + kl[4:].mean()) / 2
    torch.testing.assert_close(disc_loss(t, s, span, 2, 2.0), expected)


def test_mean_per_group_handles_empty_groups():
    out = mean_per_group(torch.tensor([1.0, 3.0]), torch.tensor([0, 0]), 2)
    assert out.tolist() == [2.0, 0.0]


def test_token_cross_entropy_matches_manual_nll():
    torch.manual_seed(2)
    logits = torch.randn(1, 4, 10)
    labels = torch.tensor([[1, 2, 3, 4]])
    logp = torch.log_softmax(logits, -1)
    manual = -(logp[0, 0, 2] + logp[0, 1, 3] + logp[0, 2, 4]) / 3
    assert math.isclose(token_cross_entropy(logits, labels).item(), manual.item(), rel_tol=1e-6)
