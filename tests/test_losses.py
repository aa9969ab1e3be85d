import math

import pytest
import torch
import torch.nn.functional as F

from softar.losses import info_nce, lm_loss, log_bessel_iv, regression_losses, vmf_nll
from softar.model.embedding import embedding_stats, frozen_random_table


def test_lm_loss_matches_a_loop():
    logits, targets = torch.randn(2, 3, 5), torch.randint(0, 5, (2, 3))
    ref = sum(-logits[b, t].log_softmax(-1)[targets[b, t]] for b in range(2) for t in range(3)) / 6
    torch.testing.assert_close(lm_loss(logits, targets), ref)


def test_regression_losses_match_a_loop():
    y, tgt = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    out = regression_losses(y, tgt)
    mse = sum(((y[b, t] - tgt[b, t]) ** 2).sum() / 4 for b in range(2) for t in range(3)) / 6
    cos = sum(1 - y[b, t] @ tgt[b, t] / (y[b, t].norm() * tgt[b, t].norm()) for b in range(2) for t in range(3)) / 6
    torch.testing.assert_close(out["mse"], mse)
    torch.testing.assert_close(out["cosine"], cos)


def test_info_nce_matches_a_loop():
    y, E, targets = torch.randn(2, 3, 4), torch.randn(7, 4), torch.randint(0, 7, (2, 3))
    ref = 0.0
    for b in range(2):
        for t in range(3):
            sims = torch.stack([F.cosine_similarity(y[b, t], E[i], dim=0) for i in range(7)]) / 0.1
            ref += -sims.log_softmax(0)[targets[b, t]]
    torch.testing.assert_close(info_nce(y, E, targets, 0.1), ref / 6)


@pytest.mark.parametrize("x", [0.1, 1.0, 7.5, 40.0])
def test_log_bessel_against_closed_forms(x):
    t = torch.tensor([x], dtype=torch.float64)
    assert log_bessel_iv(0, t).item() == pytest.approx(math.log(torch.special.i0(t.double()).item()), rel=1e-9)
    assert log_bessel_iv(1, t).item() == pytest.approx(math.log(torch.special.i1(t.double()).item()), rel=1e-9)
    half = math.log(math.sqrt(2 / (math.pi * x)) * math.sinh(x))  # I_{1/2}(x) = sqrt(2 / (pi x)) sinh x
    assert log_bessel_iv(0.5, t).item() == pytest.approx(half, rel=1e-9)


def test_vmf_nll_in_three_dimensions_matches_the_closed_form_density():
    y, target = torch.randn(5, 3, dtype=torch.float64) * 3, torch.randn(5, 3, dtype=torch.float64)
    kappa, mu = y.norm(dim=-1), F.normalize(y, dim=-1)
    x = F.normalize(target, dim=-1)
    # vMF density on the 2-sphere: kappa / (4 pi sinh kappa) * exp(kappa mu . x)
    ref = -(torch.log(kappa / (4 * math.pi * torch.sinh(kappa))) + kappa * (mu * x).sum(-1)).mean()
    torch.testing.assert_close(vmf_nll(y, target), ref)
    y.requires_grad_(True)
    vmf_nll(y, target).backward()
    assert torch.isfinite(y.grad).all()


def test_no_gradient_reaches_stop_gradient_or_frozen_targets():
    E = torch.nn.Parameter(torch.randn(7, 4))
    y = torch.randn(2, 3, 4, requires_grad=True)
    ids = torch.randint(0, 7, (2, 3))
    losses = regression_losses(y, E[ids].detach())
    (losses["mse"] + losses["cosine"] + vmf_nll(y, E[ids].detach())).backward()
    assert E.grad is None and y.grad is not None
    frozen = frozen_random_table(7, 4, seed=3)
    assert not frozen.requires_grad


def test_frozen_random_table_and_stats():
    E = frozen_random_table(50, 16, seed=1)
    assert torch.equal(E, frozen_random_table(50, 16, seed=1))
    torch.testing.assert_close(E.norm(dim=-1), torch.ones(50))
    s = embedding_stats(E)
    assert s["mean_row_norm"] == pytest.approx(1.0) and 12 < s["effective_rank"] <= 16
    assert abs(s["mean_pairwise_cosine"]) < 0.05
    collapsed = embedding_stats(torch.ones(50, 16) + 1e-3 * torch.randn(50, 16))
    assert collapsed["mean_pairwise_cosine"] > 0.99
    # a 2-d space shifted off the origin: centred, the shift is not a dimension
    plane = torch.randn(50, 2) @ torch.randn(2, 16) + 5 * torch.randn(16)
    assert embedding_stats(plane)["effective_rank"] < 2.01
