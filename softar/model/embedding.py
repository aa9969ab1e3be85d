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
