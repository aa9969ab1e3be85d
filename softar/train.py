"""The training loop: AdamW with decay groups, warmup + cosine LR, clipping, accumulation, periodic evals,
metrics (metrics.jsonl + TensorBoard + tqdm), atomic checkpoints and exact resume."""

from __future__ import annotations

import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import softar
from softar import SoftarError
from softar.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    optimizer_from_tensors,
    optimizer_to_tensors,
    save_checkpoint,
    write_text_atomic,
)
from softar.config import Config, ConfigError, diff, resolve
from softar.data.dataset import WindowSampler, load_meta, load_split
from softar.device import autocast, pick_device, set_threads
from softar.evaluate import estimate_loss, evaluate_split
from softar.losses import lm_loss
from softar.model import GPT
from softar.rundir import (
    CHECKPOINTS,
    CONFIG_FILE,
    METRICS_FILE,
    RESULT_FILE,
    RUN_FILE,
    check_data,
    data_fingerprint,
    read_config,
)

RESUMABLE_KEYS = {"train.max_iters"}  # keys a resumed run may change without changing its history


def lr_at(step: int, t) -> float:
    """Linear warmup, then cosine decay from lr to min_lr over lr_decay_iters (nanoGPT's schedule)."""
    if step < t.warmup_iters:
        return t.lr * (step + 1) / (t.warmup_iters + 1)
    if step >= t.lr_decay_iters:
        return t.min_lr
    ratio = (step - t.warmup_iters) / max(1, t.lr_decay_iters - t.warmup_iters)
    return t.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (t.lr - t.min_lr)


def make_optimizer(model: torch.nn.Module, t, device: torch.device) -> torch.optim.AdamW:
    """Weight decay on matrices (linear weights, embeddings); none on biases and norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": t.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), fused=device.type == "cuda")


def _check_run_dir(out: Path, cfg: Config, resume: bool) -> None:
    """Refuse to mix runs: a fresh run needs an empty directory; a resume needs the same config and data."""
    if (out / CONFIG_FILE).is_file():
        if not resume:
            raise SoftarError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
        changed = [k for k in diff(read_config(out), cfg) if k not in RESUMABLE_KEYS]
        if changed:
            raise SoftarError(f"{out} holds a different run (differs in {', '.join(changed)})")
        check_data(out, cfg.data.dir)
    elif resume:
        raise SoftarError(f"nothing to resume in {out} (no {CONFIG_FILE})")
    elif out.exists() and any(out.iterdir()):
        raise SoftarError(f"{out} exists and is not empty; choose another --out")


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"torch_cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["torch_cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["torch_cpu"])
    if "torch_cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["torch_cuda"], device)


class MetricsLog:
    """metrics.jsonl (every step's loss, every eval) plus TensorBoard scalars."""

    def __init__(self, run_dir: Path, start_step: int):
        self.path = run_dir / METRICS_FILE
        if start_step > 0 and self.path.is_file():  # drop what was logged after the checkpoint we resume from
            keep = [ln for ln in self.path.read_text().splitlines() if json.loads(ln)["step"] <= start_step]
            write_text_atomic(self.path, "".join(ln + "\n" for ln in keep))
        self.file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - open for the whole run
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=start_step or None)

    def write(self, row: dict) -> None:
        self.file.write(json.dumps(row) + "\n")
        for k, v in row.items():
            if k not in ("step", "kind") and isinstance(v, int | float):
                self.tb.add_scalar(f"{row['kind']}/{k}", v, row["step"])

    def flush(self) -> None:
        self.file.flush()
        self.tb.flush()

    def close(self) -> None:
        self.file.close()
        self.tb.close()


def train(cfg: Config, out: str | Path, resume: bool = False, quiet: bool = False) -> dict:
    """Train (or resume) a run in `out`; returns the result also written to `out/result.json`."""
    out = Path(out)
    meta = load_meta(cfg.data.dir)
    cfg = resolve(cfg, meta["vocab_size"])
    _check_run_dir(out, cfg, resume)
    m, t = cfg.model, cfg.train
    device = pick_device(t.device)
    set_threads(t.threads)
    train_data, val_data = load_split(cfg.data.dir, "train"), load_split(cfg.data.dir, "val")
    for name, data in (("train", train_data), ("val", val_data)):
        if len(data) <= m.block_size:
            raise ConfigError(f"model.block_size: {m.block_size} is not smaller than the {name} split "
                              f"({len(data)} tokens)")

    torch.manual_seed(t.seed)
    model = GPT(m).to(device)
    opt = make_optimizer(model, t, device)
    sampler = WindowSampler(train_data, m.block_size, t.batch_size, seed=t.seed)
    step, wall_before, train_s = 0, 0.0, 0.0
    ckpt_dir = out / CHECKPOINTS
    if resume:
        path = latest_checkpoint(ckpt_dir)
        if path is None:
            raise SoftarError(f"nothing to resume in {out}: no checkpoint yet")
        ckpt = load_checkpoint(path, device)
        model.load_state_dict(ckpt.tensors["model"])
        optimizer_from_tensors(opt, ckpt.tensors["optimizer"], ckpt.meta["optimizer"])
        sampler.load_state(ckpt.tensors["state"]["sampler"].cpu())
        _set_rng_state({k: v.cpu() for k, v in ckpt.tensors["state"].items() if k.startswith("torch")}, device)
        step, wall_before, train_s = ckpt.meta["step"], ckpt.meta["wall_s"], ckpt.meta["train_s"]
    else:
        out.mkdir(parents=True, exist_ok=True)
        run_info = {
            "seed": t.seed,
            "argv": sys.argv,
            "data": data_fingerprint(cfg.data.dir),
            "versions": {"softar": softar.__version__, "torch": torch.__version__, "numpy": np.__version__,
                         "python": platform.python_version()},
            "platform": platform.platform(),
            "device": str(device),
            "params": model.num_params(),
            "flops_per_token": model.flops_per_token(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        write_text_atomic(out / RUN_FILE, json.dumps(run_info, indent=2))
    write_text_atomic(out / CONFIG_FILE, json.dumps(cfg.to_dict(), indent=2))  # max_iters may have grown

    fwd = torch.compile(model) if t.compile else model
    amp = autocast(device, t.dtype)
    log = MetricsLog(out, step)
    tokens_per_step = t.batch_size * t.grad_accum * m.block_size

    def evaluate(at: int) -> dict:
        kw = dict(block_size=m.block_size, batch_size=t.batch_size, iters=t.eval_iters, device=device,
                  autocast_ctx=amp)
        row = {"kind": "eval", "step": at,
               "train_loss": estimate_loss(fwd, train_data, seed=t.seed + at, **kw),
               "val_loss": estimate_loss(fwd, val_data, seed=t.seed + at + 1, **kw)}
        log.write(row)
        return row

    def save(at: int, wall: float) -> None:
        opt_tensors, opt_plain = optimizer_to_tensors(opt)
        state = {"sampler": sampler.state(), **_rng_state(device)}
        tensors = {"model": model.state_dict(), "optimizer": opt_tensors, "state": state}
        meta = {"step": at, "wall_s": wall, "train_s": train_s, "optimizer": opt_plain, "config": cfg.to_dict()}
        save_checkpoint(ckpt_dir, at, tensors, meta, keep_last=t.keep_last)

    model.train()
    pending: list[tuple[int, float, torch.Tensor]] = []  # losses stay on device until a log flush
    bar = tqdm(total=t.max_iters, initial=step, disable=quiet or None, dynamic_ncols=True, unit="it")
    clock = {"t": time.perf_counter(), "step": step, "other": 0.0}  # throughput window, evals excluded
    last_eval = None
    t0 = time.perf_counter()

    def flush_train_log() -> None:
        nonlocal train_s
        if not pending:
            return
        now = time.perf_counter()
        busy = max(now - clock["t"] - clock["other"], 1e-9)
        train_s += busy
        tok_s = (step - clock["step"]) * tokens_per_step / busy
        losses = torch.stack([p[2] for p in pending]).tolist()  # one device sync per flush
        for (s, lr_s, _), loss_v in zip(pending, losses, strict=True):
            log.write({"kind": "train", "step": s, "loss": loss_v, "lr": lr_s})
        log.write({"kind": "perf", "step": step, "tokens_per_s": tok_s})
        bar.set_postfix(loss=f"{losses[-1]:.4f}", tok_s=f"{tok_s:,.0f}")
        bar.update(len(pending))
        pending.clear()
        clock.update(t=now, step=step, other=0.0)
        log.flush()
        if not math.isfinite(losses[-1]):
            raise SoftarError(f"loss became {losses[-1]} at step {step}; lower train.lr or check the data")

    while step < t.max_iters:
        lr = lr_at(step, t)
        for g in opt.param_groups:
            g["lr"] = lr
        loss_sum = torch.zeros((), device=device)
        for _ in range(t.grad_accum):
            x, y = (v.to(device, non_blocking=True) for v in sampler.next_batch())
            with amp:
                loss = lm_loss(fwd(x), y) / t.grad_accum
            loss.backward()
            loss_sum += loss.detach()
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        pending.append((step, lr, loss_sum))

        is_last = step == t.max_iters
        do_eval, do_save = step % t.eval_interval == 0 or is_last, step % t.ckpt_interval == 0 or is_last
        if step % t.log_interval == 0 or do_eval or do_save:
            flush_train_log()
        e0 = time.perf_counter()
        if do_eval:
            last_eval = evaluate(step)
            bar.write(f"step {step}: train loss {last_eval['train_loss']:.4f}, "
                      f"val loss {last_eval['val_loss']:.4f}")
        if do_save:
            save(step, wall_before + time.perf_counter() - t0)
        clock["other"] += time.perf_counter() - e0
        log.flush()
    bar.close()
    train_wall = wall_before + time.perf_counter() - t0

    full_val = evaluate_split(model, val_data, m.block_size, device, amp, meta["characters"]["val"])
    log.write({"kind": "full_val", "step": step, **full_val})
    log.close()
    result = {
        "run_dir": str(out),
        "step": step,
        "val_loss": full_val["loss"],
        "val_bits_per_token": full_val["bits_per_token"],
        "val_bits_per_char": full_val.get("bits_per_char"),
        "val_loss_sampled": last_eval["val_loss"] if last_eval else None,
        "train_loss_sampled": last_eval["train_loss"] if last_eval else None,
        "train_wall_s": train_wall,
        "tokens_per_s": step * tokens_per_step / train_s if train_s > 0 else None,
        "params": model.num_params(),
    }
    write_text_atomic(out / RESULT_FILE, json.dumps(result, indent=2))
    return result
