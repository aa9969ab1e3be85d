"""Language-model loss: sampled-batch estimates for periodic evals, and the exact loss over a whole split."""

from __future__ import annotations

import math

import numpy as np
import torch

from softar.data.dataset import WindowSampler, sequential_windows
from softar.distributed import World
from softar.losses import lm_loss


@torch.no_grad()
def estimate_loss(model, data: np.ndarray, token_slots: int, batch_size: int, iters: int, seed: int,
                  device: torch.device, autocast_ctx, history: int = 0) -> float:
    """Mean loss over `iters` random batches drawn with their own generator, so evals never move the training
    sampler's RNG (which keeps resumed runs exact). token_slots: tokens per window; history: the layout's history
    (`Layout.history`). `model` is a SoftAR, or its DDP/FSDP wrapper."""
    was_training = model.training
    model.eval()
    sampler = WindowSampler(data, token_slots, batch_size, seed, history=history)
    losses = []
    for _ in range(iters):
        x, y, *hist = (t.to(device) for t in sampler.next_batch())
        with autocast_ctx:
            losses.append(lm_loss(model(x, history=tuple(hist) or None), y))
    model.train(was_training)
    return torch.stack(losses).mean().item()


@torch.no_grad()
def evaluate_split(model, data: np.ndarray, token_slots: int, device: torch.device, autocast_ctx,
                   characters: int | None = None, batch_size: int = 64, world: World | None = None,
                   history: int = 0, soft: int = 0, soft_fill: str = "rollout") -> dict:
    """Loss over every token of a split (each predicted once, from consecutive windows of `token_slots` tokens), in
    nats and bits per token, plus bits per character when the split's character count is known. Under data
    parallelism each rank takes every world-th batch and the sums are reduced; all ranks run the same number of
    forwards (a sharded model's forward is collective), the ones past the end on a batch whose result is
    discarded. With a layout each window gets the `history` tokens before it, and with `soft` slots the loss is also
    split into the positions whose inputs are hard tokens and those that read soft ones, the soft region filled by
    a real step-by-step rollout (or `soft_fill="one_step"`: each soft slot guessed from the true tokens before it)."""
    world = world or World()
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss and count: hard slots, soft slots
    batches = list(sequential_windows(data, token_slots, batch_size, history))
    for i in range(world.rank, -(-len(batches) // world.size) * world.size, world.size):
        x, y, *hist = (v.to(device) for v in batches[min(i, len(batches) - 1)])
        with autocast_ctx:
            logits = model(x, history=tuple(hist) or None, soft_fill=soft_fill)
        k = min(soft, y.shape[1])
        if k:
            per = lm_loss(logits, y, reduction="none").view(y.shape).double()
            part = torch.stack((per[:, :-k].sum(), per[:, -k:].sum()))
        else:
            part = torch.stack((lm_loss(logits, y, reduction="sum").double(), sums.new_zeros(())))
        n = torch.tensor([y.shape[0] * (y.shape[1] - k), y.shape[0] * k], dtype=torch.float64, device=device)
        if i < len(batches):
            sums += torch.stack((part[0], n[0], part[1], n[1]))
    model.train(was_training)
    hard_loss, hard_n, soft_loss, soft_n = (world.mean(sums) * world.size).tolist()
    total, count = hard_loss + soft_loss, int(hard_n + soft_n)
    loss = total / count
    out = {"loss": loss, "bits_per_token": loss / math.log(2), "tokens": count}
    if characters:
        out["bits_per_char"] = total / math.log(2) / characters
    if soft:
        out["loss_hard_slots"], out["loss_soft_slots"] = hard_loss / hard_n, soft_loss / soft_n
    return out
