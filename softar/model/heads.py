"""Output heads: map the backbone's hidden states [B, T, d] to what the model emits."""

from __future__ import annotations

import torch
from torch import nn


class LMHead(nn.Module):
    """Tied LM head: logits = out_proj(h) @ E^T (E is the model's; `GPT.heads` applies it). With m == d_model the
    projection is the identity; out_proj(h) is also the hidden state mapped to R^m, Coconut's fed-back thought."""

    def __init__(self, d_model: int, m: int):
        super().__init__()
        self.out_proj = nn.Linear(d_model, m, bias=False) if m != d_model else nn.Identity()


class VectorHead(nn.Module):
    """y = W h: the model's own point in R^m, trained by regression to the next token's embedding."""

    def __init__(self, d_model: int, m: int):
        super().__init__()
        self.proj = nn.Linear(d_model, m)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj(h)  # [B, T, d] -> [B, T, m]


class CollapseHead(nn.Module):
    """The learned collapse: an MLP from a layer in which the whole context is mixed onto R^m, trained on hard-token
    text against the next token's embedding; its output collapses to the nearest row of E."""

    def __init__(self, d_model: int, m: int):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(d_model), nn.Linear(d_model, 4 * d_model), nn.GELU(),
                                 nn.Linear(4 * d_model, m))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)  # [B, T, d] -> [B, T, m]
