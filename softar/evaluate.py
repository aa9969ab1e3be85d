"""Metrics: sampled-batch loss estimates for periodic evals, and exact loss over a whole split."""

from __future__ import annotations

import math

import numpy as np
import torch

from softar.data.dataset import WindowSampler, sequential_windows
from softar.losses import lm_loss
from softar.model import GPT


@torch.no_grad()
def estimate_loss(model: GPT, data: np.ndarray, block_size: int, batch_size: int, iters: int, seed: int,
                  device: torch.device, autocast_ctx) -> float:
    """Mean loss over `iters` random batches drawn with their own generator, so evals never move the
    training sampler's RNG (which keeps resumed runs exact)."""
    was_training = model.training
    model.eval()
    sampler = WindowSampler(data, block_size, batch_size, seed)
    losses = []
    for _ in range(iters):
        x, y = (t.to(device) for t in sampler.next_batch())
        with autocast_ctx:
            losses.append(lm_loss(model(x), y))
    model.train(was_training)
    return torch.stack(losses).mean().item()


@torch.no_grad()
def evaluate_split(model: GPT, data: np.ndarray, block_size: int, device: torch.device, autocast_ctx,
                   characters: int | None = None, batch_size: int = 64) -> dict:
    """Loss over every token of a split (each predicted once, from consecutive windows), in nats and bits
    per token, plus bits per character when the split's character count is known."""
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), dtype=torch.float64), 0
    for x, y in sequential_windows(data, block_size, batch_size):
        x, y = x.to(device), y.to(device)
        with autocast_ctx:
            total += lm_loss(model(x), y, reduction="sum").double().cpu()
        count += y.numel()
    model.train(was_training)
    loss = total.item() / count
    out = {"loss": loss, "bits_per_token": loss / math.log(2), "tokens": count}
    if characters:
        out["bits_per_char"] = total.item() / math.log(2) / characters
    return out
