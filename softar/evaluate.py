"""Metrics: sampled-batch loss estimates for periodic evals, and exact loss over a whole split."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from softar.collapse import collapse, round_trip_gap, sample_ids, soft_token
from softar.data.dataset import WindowSampler, sequential_windows
from softar.distributed import World
from softar.losses import lm_loss
from softar.model import GPT, KVCache


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


def _windows(data: np.ndarray, length: int, count: int, seed: int, device: torch.device) -> torch.Tensor:
    """`count` random windows of `length` tokens, drawn with their own generator: [count, length]."""
    sampler = WindowSampler(data, length - 1, count, seed)
    x, y = sampler.next_batch()
    return torch.cat([x, y[:, -1:]], dim=1).to(device)


@torch.no_grad()
def soft_output_metrics(model: GPT, data: np.ndarray, windows: int = 64, seed: int = 0,
                        device: torch.device | str = "cpu") -> dict:
    """Teacher-forced quality of the model's soft outputs against the next token's embedding: l2, cosine,
    nearest-neighbour top-1 and the round-trip gap l2-r, for the expected embedding p @ E (every model) and the
    vector head's y (models that have one); plus the LM head's top-1 for reference."""
    model.eval()
    ids = _windows(data, model.cfg.block_size + 1, windows, seed, device)
    x, y = ids[:, :-1], ids[:, 1:]
    E = model.embed.weight
    out = model.heads(model.hidden(model.embed(x)))
    target = E[y]
    vectors = {"expected": out["logits"].float().softmax(-1) @ E}
    if "y" in out:
        vectors["regress"] = out["y"]
    result = {"lm_top1": (out["logits"].argmax(-1) == y).float().mean().item()}
    for name, v in vectors.items():
        result[name] = {
            "l2": (v - target).norm(dim=-1).mean().item(),
            "cosine": F.cosine_similarity(v, target, dim=-1).mean().item(),
            "nn_top1": (collapse("nn_l2", E, v) == y).float().mean().item(),
            "l2_r": round_trip_gap(v, E).mean().item(),
        }
    return result


def feedback_modes(model: GPT) -> list[str]:
    """What an open-loop rollout can feed back: the truth (teacher), collapsed tokens, or each soft token."""
    modes = ["teacher", "greedy", "sampled", "soft_expected", "soft_hidden", "soft_gated"]
    return modes + (["soft_regress"] if model.vector_head is not None else [])


@torch.no_grad()
def open_loop_loss(model: GPT, data: np.ndarray, horizon: int, modes: list[str] | None = None, windows: int = 64,
                   seed: int = 0, device: torch.device | str = "cpu") -> dict[str, float]:
    """Cross-entropy on the true next `horizon` tokens when, for those steps, the model's inputs are its own outputs
    (soft tokens, or its greedy or sampled collapse) instead of the truth. The prefix fills the rest of the window.
    `teacher` feeds the truth: the teacher-forced loss on the same positions, for reference."""
    model.eval()
    block = model.cfg.block_size
    if not 1 <= horizon < block:
        raise ValueError(f"horizon {horizon} must be in [1, block_size={block})")
    prefix = block - horizon
    ids = _windows(data, block + 1, windows, seed, device)
    truth = ids[:, prefix + 1 :]  # [B, horizon]: the tokens each step must predict
    E = model.embed.weight
    results = {}
    for mode in modes or feedback_modes(model):
        gen = torch.Generator(device=ids.device).manual_seed(seed)
        cache = KVCache(model.cfg, ids.shape[0], block, ids.device, E.dtype)
        out = model.heads(model.hidden(model.embed(ids[:, : prefix + 1]), cache=cache)[:, -1:])
        losses = []
        for k in range(horizon):
            logits = out["logits"][:, -1]
            losses.append(F.cross_entropy(logits.float(), truth[:, k]))
            if k == horizon - 1:
                break
            if mode == "teacher":
                vec = E[truth[:, k]]
            elif mode == "greedy":
                vec = E[logits.argmax(-1)]
            elif mode == "sampled":
                vec = E[sample_ids(logits, gen)]
            else:
                kind = mode.removeprefix("soft_")
                y = out["y"][:, -1] if "y" in out else None
                vec = soft_token(kind, E, logits, y, out["h_m"][:, -1], generator=gen)
            out = model.heads(model.hidden(vec.unsqueeze(1), cache=cache))
        results[mode] = torch.stack(losses).mean().item()
    return results


@torch.no_grad()
def brier_lm(model: GPT, data: np.ndarray, windows: int = 64, seed: int = 0, max_n: int = 4,
             device: torch.device | str = "cpu") -> dict[str, float]:
    """BrierLM (CALM): from the true prefix draw two independent n-token continuations x1, x2 from the model; the
    unbiased Brier-n estimate is 1[x1 = y] + 1[x2 = y] - 1[x1 = x2] for the true n-gram y. BrierLM is 100 times the
    geometric mean of Brier-1..4. Samples come from the LM head at temperature 1, the same way for every model."""
    model.eval()
    block = model.cfg.block_size
    prefix = block - max_n
    ids = _windows(data, block + 1, windows, seed, device)
    truth = ids[:, prefix + 1 : prefix + 1 + max_n]
    gen = torch.Generator(device=ids.device).manual_seed(seed)
    draws = []
    for _ in range(2):
        cache = KVCache(model.cfg, ids.shape[0], block, ids.device, model.embed.weight.dtype)
        logits = model(ids[:, : prefix + 1], cache=cache)[:, -1]
        seq = []
        for k in range(max_n):
            tok = sample_ids(logits, gen)
            seq.append(tok)
            if k < max_n - 1:
                logits = model(tok.unsqueeze(1), cache=cache)[:, -1]
        draws.append(torch.stack(seq, dim=1))
    x1, x2 = draws
    result = {}
    for n in range(1, max_n + 1):
        hit1, hit2, agree = ((a[:, :n] == b[:, :n]).all(-1).float() for a, b in ((x1, truth), (x2, truth), (x1, x2)))
        result[f"brier{n}"] = (hit1 + hit2 - agree).mean().item()
    product = math.prod(max(result[f"brier{n}"], 0.0) for n in range(1, max_n + 1))
    result["brierlm"] = 100 * product ** (1 / max_n)
    return result


DEFAULT_HORIZONS = (8, 32)


def evaluate_run(run_dir, split: str = "val", data_dir: str | None = None, windows: int = 256,
                 horizons: tuple[int, ...] | None = None, seed: int = 0, device_name: str = "auto") -> dict:
    """Every metric `softar eval` reports, for a run directory's latest checkpoint. Without `horizons`, the
    open-loop loss is measured at those of 8 and 32 that fit in the model's window."""
    from softar import SoftarError
    from softar.data.dataset import load_meta, load_split
    from softar.device import autocast, pick_device
    from softar.model.embedding import embedding_stats
    from softar.rundir import load_run

    device = pick_device(device_name)
    run = load_run(run_dir, device, data_dir)
    data_dir = data_dir or run.cfg.data.dir
    block = run.cfg.model.block_size
    horizons = horizons or tuple(k for k in DEFAULT_HORIZONS if k < block)
    for k in horizons:
        if not 1 <= k < block:
            raise SoftarError(f"--horizons: {k} must be in [1, model.block_size={block})")
    data = load_split(data_dir, split)
    chars = load_meta(data_dir)["characters"][split]
    metrics = evaluate_split(run.model, data, block, device, autocast(device, run.cfg.train.dtype), chars)
    kw = dict(windows=windows, seed=seed, device=device)
    return {"run_dir": str(run_dir), "step": run.step, "split": split, **metrics,
            "embedding": embedding_stats(run.model.embed.weight),
            "soft_outputs": soft_output_metrics(run.model, data, **kw),
            "brier": brier_lm(run.model, data, **kw),
            "open_loop": {str(k): open_loop_loss(run.model, data, k, **kw) for k in horizons}}
