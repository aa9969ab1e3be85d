"""Output heads: map the backbone's hidden states [B, T, d] to what the model emits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LMHead(nn.Module):
    """Tied LM head: logits = out_proj(h) @ E^T. With m == d_model the projection is the identity."""

    def __init__(self, d_model: int, m: int):
        super().__init__()
        self.out_proj = nn.Linear(d_model, m, bias=False) if m != d_model else nn.Identity()

    def forward(self, h: torch.Tensor, embedding_weight: torch.Tensor) -> torch.Tensor:
        return F.linear(self.out_proj(h), embedding_weight)  # [B, T, d] -> [B, T, V]
