"""GRPO's pieces as pure functions: group-normalised advantages, PPO's clipped objective over a rollout's actions,
a KL estimate to a reference policy, and pass@k (a noisy soft thought's log-density is its feed's,
`softar.soft.feeds.gaussian_log_density`).

An *action* is anything a rollout drew: a sampled token, or a noisy soft thought (Soft Tokens, Hard Truths: the
thought x = mu + sigma * eps has log-density log N(x; mu, sigma^2 I), so it is a stochastic action with a likelihood
like a token's). Shapes: N rollouts, T action slots per rollout; `mask` [N, T] marks the real actions.
"""

from __future__ import annotations

import math

import torch


def group_advantages(rewards: torch.Tensor, scale: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """rewards [P, G] (P prompts, a group of G rollouts each) -> advantages [P, G]: the reward minus its group's
    mean, divided by the group's standard deviation (population) when `scale` (GRPO; Dr. GRPO leaves it out). A
    group whose rewards are all equal carries no signal: its advantages are 0."""
    same = (rewards == rewards[..., :1]).all(-1, keepdim=True)  # exactly: a float mean would leave rounding
    centred = torch.where(same, 0.0, rewards - rewards.mean(-1, keepdim=True))
    if not scale:
        return centred
    return centred / (rewards.std(-1, correction=0, keepdim=True) + eps)


def clipped_objective(logp: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                      clip: float, average: str = "sequence") -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate, per action, averaged over each rollout's actions and then over rollouts (GRPO,
    `average="sequence"`), or over all actions at once (`"token"`: DAPO).

    logp, logp_old, mask [N, T]; advantages [N]. Returns (the loss to minimise, the clipped fraction of actions).
    The ratio exp(logp - logp_old) is exactly 1 on the first inner step, where logp_old is logp detached."""
    ratio = (logp - logp_old).exp()
    a = advantages[:, None]
    surrogate = torch.minimum(ratio * a, ratio.clamp(1 - clip, 1 + clip) * a)
    m = mask.to(surrogate.dtype)
    clipped = (((ratio - 1).abs() > clip) & mask).sum() / mask.sum().clamp_min(1)
    if average == "token":
        return -(surrogate * m).sum() / m.sum().clamp_min(1), clipped.detach()
    per_rollout = (surrogate * m).sum(-1) / m.sum(-1).clamp_min(1)
    return -per_rollout.mean(), clipped.detach()


def kl_to_reference(logp: torch.Tensor, logp_ref: torch.Tensor, mask: torch.Tensor,
                    average: str = "sequence") -> torch.Tensor:
    """The k3 estimate of KL(policy || reference) per action, exp(r) - r - 1 with r = logp_ref - logp clamped to
    [-20, 20] (unbiased within it, never negative), averaged as `clipped_objective` averages (`average`)."""
    r = (logp_ref - logp).clamp(-20, 20)  # a noisy thought's log-density ratio can be large: no overflow
    k3 = r.exp() - r - 1
    m = mask.to(k3.dtype)
    if average == "token":
        return (k3 * m).sum() / m.sum().clamp_min(1)
    return ((k3 * m).sum(-1) / m.sum(-1).clamp_min(1)).mean()


def group_weights(actions: torch.Tensor, average: str, total: torch.Tensor, ranks: int = 1) -> torch.Tensor:
    """Each prompt group's weight in the batch loss, the groups' own losses averaged as `clipped_objective`
    averages: 1/P each for "sequence" (P groups on this rank), or for "token" the group's share of the global
    batch's actions, `actions` [P] this rank's counts and `total` the count over all ranks, times `ranks` since
    the gradients are then averaged over ranks: every action of the global batch then weighs 1/total."""
    if average == "token":
        return actions.float() * ranks / total.float().clamp_min(1)
    return torch.full(actions.shape, 1 / len(actions), device=actions.device)


PASS_K = (1, 4, 16, 32)  # the k of every pass@k softAR reports (up to the number of samples)


def pass_at_k(n: int, correct: int, k: int) -> float:
    """The unbiased estimate of pass@k from n samples of which `correct` passed (Chen et al. 2021): the chance
    that k of the n, drawn without replacement, hold at least one correct one."""
    if not 0 <= correct <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= correct <= n and 1 <= k <= n, got n={n}, correct={correct}, k={k}")
    if n - correct < k:
        return 1.0
    return 1.0 - math.prod(1 - k / i for i in range(n - correct + 1, n + 1))


def guessed_pass_at_k(n: int, guesses: int, k: int, chance: float = 0.5) -> float:
    """The expected pass@k of n samples of which `guesses` name an option at random (each right with probability
    `chance`: 1/2 between two options) and the rest are wrong: the option-guessing null of a multiple-choice task."""
    return sum(math.comb(guesses, r) * chance**r * (1 - chance) ** (guesses - r) * pass_at_k(n, r, k)
               for r in range(guesses + 1))
