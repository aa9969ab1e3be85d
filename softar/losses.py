"""Training losses."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of logits [B, T, V] against targets [B, T], computed in float32."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction=reduction)
