"""`softar bench`: training throughput as a fraction of a matmul peak measured in the same process, and
generation speed with and without the KV cache. Figures are medians over repeated timings."""

from __future__ import annotations

import statistics
import time

import torch

from softar.config import Config, resolve
from softar.data.dataset import WindowSampler, load_meta, load_split
from softar.device import autocast, pick_device, set_threads
from softar.generate import Decoding, generate
from softar.soft.model import build_model
from softar.train import make_optimizer, optimizer_step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_time(fn, device: torch.device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_peak(device: torch.device, dtype: torch.dtype = torch.float32, repeats: int = 10,
                sizes: tuple[int, ...] | None = None) -> dict:
    """Best median FLOP/s of square matmuls over a few sizes: the peak this device reaches right now."""
    sizes = sizes or ((512, 1024, 2048) if device.type == "cpu" else (4096, 8192))
    best = {}
    for n in sizes:
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        a @ b  # warm up
        flops = 2 * n**3 / _median_time(lambda a=a, b=b: a @ b, device, repeats)
        if flops > best.get("flops", 0):
            best = {"flops": flops, "n": n}
    return best


def bench_train(cfg: Config, steps: int = 30, warmup: int = 5) -> dict:
    meta = load_meta(cfg.data.dir)
    cfg = resolve(cfg, meta["vocab_size"])
    t = cfg.train
    device = pick_device(t.device)
    set_threads(t.threads)
    torch.manual_seed(t.seed)
    model = build_model(cfg).to(device)
    opt = make_optimizer(model, t, device)
    fwd = torch.compile(model) if t.compile else model
    amp = autocast(device, t.dtype)
    lay = model.layout
    sampler = WindowSampler(load_split(cfg.data.dir, "train"), lay.token_slots, t.batch_size, t.seed,
                            history=lay.history)
    batches = [tuple(v.to(device) for v in sampler.next_batch()) for _ in range(t.grad_accum)]

    def step() -> None:  # the training loop's own step
        optimizer_step(model, fwd, opt, batches, t.grad_clip, amp)

    for _ in range(warmup):
        step()
    peak_dtype = torch.bfloat16 if t.dtype == "bfloat16" else torch.float32
    size = matmul_peak(device, peak_dtype, repeats=3)["n"]
    # Alternate peak and step timings in rounds so both see the same machine load. Each round takes medians; the
    # fraction compares the best round of each (load only ever slows things down), and the medians are reported too.
    rounds = 5
    peaks, step_times = [], []
    for _ in range(rounds):
        peaks.append(matmul_peak(device, peak_dtype, sizes=(size,))["flops"])
        step_times.append(_median_time(step, device, max(1, steps // rounds)))
    peak, step_s = max(peaks), min(step_times)
    tokens = t.batch_size * t.grad_accum * lay.token_slots
    tok_s = tokens / step_s
    flops = tok_s * model.flops_per_token()
    median_flops = tokens / statistics.median(step_times) * model.flops_per_token()
    return {
        "bench": "train",
        "device": str(device),
        "dtype": t.dtype,
        "threads": torch.get_num_threads(),
        "params": model.num_params(),
        "flops_per_token": model.flops_per_token(),
        "step_ms": step_s * 1e3,
        "tokens_per_s": tok_s,
        "achieved_flops": flops,
        "matmul_peak_flops": peak,
        "matmul_size": size,
        "fraction_of_peak": flops / peak,
        "fraction_of_peak_medians": median_flops / statistics.median(peaks),
        "rounds": rounds,
    }


HISTORY_LENGTHS = (1_000, 100_000)


def bench_sample(cfg: Config, new_tokens: int = 500, repeats: int = 5) -> dict:
    """Batch-1 greedy generation from a randomly initialised model of the config's shape. A plain model: with and
    without the KV cache. A model with a context layout: soft generation per token after 1,000 and after 100,000
    tokens of history (the memory hierarchy must make these equal)."""
    vocab = load_meta(cfg.data.dir)["vocab_size"] if cfg.model.vocab_size == 0 else cfg.model.vocab_size
    cfg = resolve(cfg, vocab)
    device = pick_device(cfg.train.device)
    set_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg).to(device).eval()
    result = {"bench": "sample", "device": str(device), "batch_size": 1, "new_tokens": new_tokens,
              "block_size": cfg.model.block_size}
    if not model.layout.plain:
        dec = Decoding(mode="soft", temperature=0)
        prompts = {h: torch.randint(vocab, (1, h), generator=torch.Generator().manual_seed(0)).to(device)
                   for h in HISTORY_LENGTHS}
        per_token: dict[int, list[float]] = {h: [] for h in HISTORY_LENGTHS}
        first: dict[int, list[float]] = {h: [] for h in HISTORY_LENGTHS}
        generate(model, prompts[HISTORY_LENGTHS[0]], 20, decoding=dec)  # warm up
        for _ in range(repeats):  # alternate, so both lengths see the same machine load
            for h, p in prompts.items():
                # the prompt enters the hierarchy once (O(history)); what follows is per token
                t1 = _median_time(lambda p=p: generate(model, p, 1, decoding=dec), device, 1)
                tn = _median_time(lambda p=p: generate(model, p, new_tokens + 1, decoding=dec), device, 1)
                first[h].append(t1 * 1e3)
                per_token[h].append((tn - t1) / new_tokens * 1e3)
        for h in HISTORY_LENGTHS:
            result[f"ms_per_token_history_{h}"] = statistics.median(per_token[h])
            result[f"ms_prompt_and_first_token_history_{h}"] = statistics.median(first[h])
        a, b = (result[f"ms_per_token_history_{h}"] for h in HISTORY_LENGTHS)
        result["history_slowdown"] = b / a
        return result
    prompt = torch.zeros(1, 1, dtype=torch.long, device=device)
    for name, cached in (("kv_cache", True), ("no_cache", False)):
        generate(model, prompt, 20, temperature=0, use_cache=cached)  # warm up
        s = _median_time(lambda c=cached: generate(model, prompt, new_tokens, temperature=0, use_cache=c),
                         device, repeats)
        result[f"tokens_per_s_{name}"] = new_tokens / s
    result["cache_speedup"] = result["tokens_per_s_kv_cache"] / result["tokens_per_s_no_cache"]
    return result
