"""The learned gate of the `gated` thought policy: HRPO's hybrid of a sampled token and the model's soft thought
(Yue et al. 2025, "Hybrid latent reasoning via reinforcement learning").

At a thought slot the policy samples a token y (its action, with the ordinary log-probability) and feeds

    x = a * E[y] + sqrt(1 - a^2) * (i * s)        a = exp(-c * softplus(L) * sigmoid(W_a h)),  i = sigmoid(W_i h)

where h is the model's output at the slot before (`Outputs.h_m`), s its soft token (`soft.kind`, e.g. Coconut's
hidden state) rescaled to the embeddings' root-mean-square coordinate, and a, i, L are per coordinate. RL trains
W_a, W_i and L through the later tokens' log-probabilities, which depend on x. The gate starts near the hard
policy: W = 0, and L such that a = `start` (0.95) everywhere, so the soft part enters with weight about 0.16.

A supervised run has no gate: an RL run with rl.policy = "gated" adds one (`build_model`) and starts it fresh
(`load_initial`), unless it starts from a gated RL run, whose gate it continues."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

GATE = "thought_gate"  # the gate's name in the model, and so the prefix of its parameters in a checkpoint


class ThoughtGate(nn.Module):
    def __init__(self, m: int, c: float = 8.0, start: float = 0.95):
        super().__init__()
        self.c = c
        self.rate = nn.Linear(m, m)  # W_a
        self.mix = nn.Linear(m, m)  # W_i
        for layer in (self.rate, self.mix):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        # softplus(L) = -2 log(start) / c gives a = start where sigmoid(W_a h) = 1/2 (W_a = 0)
        target = -2 * math.log(start) / c
        self.log_scale = nn.Parameter(torch.full((m,), math.log(math.expm1(target))))

    def forward(self, h: torch.Tensor, token: torch.Tensor, soft: torch.Tensor, rms: torch.Tensor) -> torch.Tensor:
        """h, token (E[y]), soft: [..., m]; rms: the embeddings' root-mean-square coordinate -> the thought [..., m]."""
        a = torch.exp(-self.c * F.softplus(self.log_scale) * torch.sigmoid(self.rate(h)))
        s = soft * (rms / soft.pow(2).mean(-1, keepdim=True).clamp_min(1e-12).sqrt())
        return a * token + (1 - a * a).clamp_min(0).sqrt() * torch.sigmoid(self.mix(h)) * s


def load_initial(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load the initial run's weights into an RL model. A supervised run has no gate, so the model's keeps its
    starting values; a gated RL run's gate is loaded with the rest (`check_policy` refuses a gate the model lacks)."""
    model.load_state_dict({**gate_state(model.state_dict()), **state})  # strict: all else must match


def gate_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The gate's entries of a state dict (none for a model without one)."""
    return {k: v for k, v in state.items() if k.startswith(GATE + ".")}
