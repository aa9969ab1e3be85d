"""Embedding spaces: the table E [V, m] whose rows are the hard tokens' vectors in R^m."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TokenEmbedding(nn.Module):
    """A learned embedding table. Its weight is also the tied LM head's output matrix."""

    def __init__(self, vocab_size: int, m: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, m))
        nn.init.normal_(self.weight, mean=0.0, std=0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)  # [B, T] -> [B, T, m]


def frozen_random_table(vocab_size: int, m: int, seed: int = 0) -> torch.Tensor:
    """Unit-norm Gaussian rows from a fixed seed: a space no training can collapse."""
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(vocab_size, m, generator=g), dim=-1)


@torch.no_grad()
def embedding_stats(E: torch.Tensor) -> dict[str, float]:
    """Diagnostics that make collapse of a learned space visible: mean row norm, effective rank of the centred table
    (exp of the entropy of the normalised singular values, Roy & Vetterli 2007; centred, so a shared offset of
    every row does not count as a dimension) and mean pairwise cosine (off the diagonal)."""
    E = E.detach().float()
    s = torch.linalg.svdvals(E - E.mean(0))
    p = s / s.sum()
    eff_rank = torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum()).item()
    U = F.normalize(E, dim=-1)
    n = E.shape[0]
    cos_sum = (U.sum(0).pow(2).sum() - U.pow(2).sum()).item()  # sum over i != j of u_i . u_j
    return {"mean_row_norm": E.norm(dim=-1).mean().item(), "effective_rank": eff_rank,
            "mean_pairwise_cosine": cos_sum / (n * (n - 1)) if n > 1 else 0.0}
