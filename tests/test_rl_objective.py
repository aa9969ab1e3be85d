"""GRPO's pure pieces against hand-built cases, slow references and closed forms."""

import itertools
import math

import numpy as np
import pytest
import torch

from softar.rl.objective import (
    clipped_objective,
    group_advantages,
    group_weights,
    guessed_pass_at_k,
    kl_to_reference,
    pass_at_k,
)
from softar.soft.feeds import gaussian_log_density


def test_advantages_of_a_hand_built_group():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0], [3.0, 0.0, 0.0, 0.0]])
    a = group_advantages(rewards)
    torch.testing.assert_close(a[0], torch.tensor([1.0, -1.0, -1.0, 1.0]), atol=1e-5, rtol=0)
    assert torch.equal(a[1], torch.zeros(4))  # no spread, no signal
    std = math.sqrt((2.25**2 + 3 * 0.75**2) / 4)  # mean 0.75, population std
    torch.testing.assert_close(a[2], torch.tensor([2.25, -0.75, -0.75, -0.75]) / std, atol=1e-5, rtol=0)
    assert torch.equal(group_advantages(rewards, scale=False)[2], torch.tensor([2.25, -0.75, -0.75, -0.75]))
    for value in (0.1, 0.7, 1 / 3):  # equal rewards whose float mean is not exact: still no signal
        assert torch.equal(group_advantages(torch.full((1, 8), value)), torch.zeros(1, 8))


def slow_objective(logp, logp_old, adv, mask, clip, average="sequence"):
    """The clipped surrogate written out action by action: each rollout's mean, then their mean; or ("token") the
    sum over every action of the batch over their number."""
    total, actions = 0.0, 0
    for n in range(logp.shape[0]):
        acts = [t for t in range(logp.shape[1]) if mask[n, t]]
        per = 0.0
        for t in acts:
            ratio = torch.exp(logp[n, t] - logp_old[n, t])
            unclipped, clipped = ratio * adv[n], torch.clamp(ratio, 1 - clip, 1 + clip) * adv[n]
            per = per + (unclipped if unclipped <= clipped else clipped)
        total = total + (per if average == "token" else per / max(len(acts), 1))
        actions += len(acts)
    return -total / (actions if average == "token" else logp.shape[0])


@pytest.mark.parametrize("average", ["sequence", "token"])
def test_the_clipped_objective_and_its_gradient_against_a_slow_reference(average):
    g = torch.Generator().manual_seed(0)
    logp_old = -torch.rand(6, 5, generator=g) * 3
    base = (logp_old + torch.randn(6, 5, generator=g) * 0.4).detach()  # ratios on both sides of the clip range
    adv = torch.randn(6, generator=g)
    mask = torch.rand(6, 5, generator=g) < 0.7
    mask[0] = False  # a rollout without actions counts as 0
    fast_in, slow_in = base.clone().requires_grad_(), base.clone().requires_grad_()
    loss, clipped = clipped_objective(fast_in, logp_old, adv, mask, 0.2, average)
    ref = slow_objective(slow_in, logp_old, adv, mask, 0.2, average)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(fast_in.grad, slow_in.grad)
    assert (fast_in.grad[~mask] == 0).all() and 0 < clipped < 1
    ratio = (base - logp_old).exp()
    beyond = mask & (((ratio > 1.2) & (adv[:, None] > 0)) | ((ratio < 0.8) & (adv[:, None] < 0)))
    assert beyond.any() and (fast_in.grad[beyond] == 0).all()  # clipped on the side that would gain: no gradient


def test_the_ratio_is_exactly_one_on_the_first_inner_step():
    g = torch.Generator().manual_seed(1)
    logp = (-torch.rand(4, 3, generator=g)).requires_grad_()
    adv, mask = torch.tensor([1.0, -2.0, 0.5, 0.0]), torch.ones(4, 3, dtype=torch.bool)
    loss, clipped = clipped_objective(logp, logp.detach(), adv, mask, 0.2)
    assert clipped == 0
    assert loss.item() == pytest.approx(-adv.mean().item())
    loss.backward()  # the policy gradient: -A / (actions per rollout x rollouts) on each action
    torch.testing.assert_close(logp.grad, -adv[:, None].expand(4, 3) / 12)


def test_the_kl_estimate_is_exact_in_expectation():
    """E_p[exp(r) - r - 1], r = log q - log p, is KL(p || q): summed over actions weighted by p, exactly."""
    p, q = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.2, 0.2, 0.6])
    one = torch.ones(1, 1, dtype=torch.bool)
    expected = sum(p[a] * kl_to_reference(p[a].log().view(1, 1), q[a].log().view(1, 1), one) for a in range(3))
    torch.testing.assert_close(expected, (p * (p / q).log()).sum())
    assert kl_to_reference(p.log()[None], p.log()[None], torch.ones(1, 3, dtype=torch.bool)) == 0
    # rollouts of different lengths: each averages over its own actions, then the rollouts count alike
    logp = torch.tensor([[-1.0, -2.0, -9.0], [-0.5, -9.0, -9.0]])
    ref = torch.tensor([[-1.5, -1.0, 0.0], [-1.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    k3 = lambda a, b: math.exp(b - a) - (b - a) - 1  # noqa: E731
    expected = ((k3(-1.0, -1.5) + k3(-2.0, -1.0)) / 2 + k3(-0.5, -1.0)) / 2
    assert kl_to_reference(logp, ref, mask).item() == pytest.approx(expected)


def test_the_noisy_thought_log_density_is_the_gaussian_closed_form():
    g = torch.Generator().manual_seed(2)
    mean, x = torch.randn(3, 7, generator=g), torch.randn(3, 7, generator=g)
    for sigma in (0.1, 1.0, 3.0):
        closed = torch.distributions.Normal(mean, sigma).log_prob(x).sum(-1)
        torch.testing.assert_close(gaussian_log_density(x, mean, sigma), closed)


def test_pass_at_k_is_the_chance_that_k_draws_hold_a_correct_one():
    for n, correct, k in [(5, 0, 1), (5, 1, 1), (5, 2, 3), (6, 3, 4), (6, 6, 2), (4, 1, 4)]:
        draws = list(itertools.combinations([True] * correct + [False] * (n - correct), k))
        assert pass_at_k(n, correct, k) == pytest.approx(sum(any(d) for d in draws) / len(draws))
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)


def test_the_option_guessing_null_in_closed_form():
    """Of n samples, m name one of two options at random: pass@1 is m / 2n, and pass@n is 1 - 2^-m; the general case
    against drawing the coin flips and the k samples."""
    for n, m in [(4, 0), (4, 3), (8, 8), (32, 20)]:
        assert guessed_pass_at_k(n, m, 1) == pytest.approx(m / (2 * n))
        assert guessed_pass_at_k(n, m, n) == pytest.approx(1 - 0.5**m)
    rng = np.random.default_rng(0)
    n, m, k, trials = 6, 4, 3, 40000
    hits = 0
    for _ in range(trials):
        right = np.zeros(n, bool)
        right[:m] = rng.random(m) < 0.5
        hits += right[rng.choice(n, k, replace=False)].any()
    assert guessed_pass_at_k(n, m, k) == pytest.approx(hits / trials, abs=0.01)


def test_group_weights_make_the_token_average_of_the_whole_batch_across_ranks():
    """Token averaging: per-group token means, weighted by `group_weights` and averaged over ranks as the gradients
    are, equal one token mean over every action of the global batch (and sequence averaging is 1/P per group)."""
    g = torch.Generator().manual_seed(1)
    logp = -torch.rand(8, 6, generator=g)
    old = logp + torch.randn(8, 6, generator=g) * 0.3
    adv = torch.randn(8, generator=g)
    mask = torch.rand(8, 6, generator=g) < 0.6
    mask[3] = False
    whole = clipped_objective(logp, old, adv, mask, 0.2, "token")[0]
    ranks = [range(0, 2), range(2, 4)], [range(4, 6), range(6, 8)]  # 2 ranks x 2 groups of 2 rollouts
    counts = [torch.stack([mask[list(grp)].sum() for grp in rank]) for rank in ranks]
    total = sum(c.sum() for c in counts)
    per_rank = []
    for rank, c in zip(ranks, counts, strict=True):
        w = group_weights(c, "token", total, ranks=2)
        per_rank.append(sum(w[k] * clipped_objective(logp[list(grp)], old[list(grp)], adv[list(grp)],
                                                     mask[list(grp)], 0.2, "token")[0] for k, grp in enumerate(rank)))
    torch.testing.assert_close(sum(per_rank) / 2, whole)  # the mean over ranks, as `World.mean_grads` takes
    assert torch.equal(group_weights(counts[0], "sequence", total), torch.tensor([0.5, 0.5]))
    kl_whole = kl_to_reference(logp, old, mask, "token")
    kl_parts = sum(group_weights(torch.stack([mask[list(grp)].sum() for grp in pair]), "token", mask.sum())[k]
                   * kl_to_reference(logp[list(grp)], old[list(grp)], mask[list(grp)], "token")
                   for pair in [[range(0, 4), range(4, 8)]] for k, grp in enumerate(pair))
    torch.testing.assert_close(kl_parts, kl_whole)
