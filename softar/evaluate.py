"""Metrics: sampled-batch loss estimates for periodic evals, and exact loss over a whole split."""

from __future__ import annotations

import math

import numpy as np
import torch

from softar.data.dataset import WindowSampler, sequential_windows
from softar.distributed import World
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
                   characters: int | None = None, batch_size: int = 64, world: World | None = None) -> dict:
    """Loss over every token of a split (each predicted once, from consecutive windows), in nats and bits
    per token, plus bits per character when the split's character count is known. Under data parallelism each
    rank takes every world-th batch and the sums are reduced; all ranks run the same number of forwards (a
    sharded model's forward is collective), the ones past the end on a batch whose result is discarded."""
    world = world or World()
    was_training = model.training
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # total loss, token count
    batches = list(sequential_windows(data, block_size, batch_size))
    for i in range(world.rank, -(-len(batches) // world.size) * world.size, world.size):
        x, y = (v.to(device) for v in batches[min(i, len(batches) - 1)])
        with autocast_ctx:
            loss = lm_loss(model(x), y, reduction="sum").double()
        if i < len(batches):
            sums += torch.stack((loss, torch.tensor(y.numel(), dtype=torch.float64, device=device)))
    model.train(was_training)
    total, count = (world.mean(sums) * world.size).tolist()
    count = int(count)
    loss = total / count
    out = {"loss": loss, "bits_per_token": loss / math.log(2), "tokens": count}
    if characters:
        out["bits_per_char"] = total / math.log(2) / characters
    return out
