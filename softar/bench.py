"""`softar bench`: training throughput as a fraction of a matmul peak measured in the same process, and
generation speed with and without the KV cache. Figures are medians over repeated timings."""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

from softar import SoftarError
from softar.config import Config, resolve
from softar.data.dataset import WindowSampler, load_meta, load_split
from softar.decode import Decoding
from softar.device import autocast, bf16_hardware, pick_device, set_threads
from softar.soft.collapse import Sampling
from softar.soft.feeds import HardFeed, SoftFeed
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


class _HFLoss(torch.nn.Module):
    """A Hugging Face causal LM behind softAR's training-step interface: (loss, parts) from (x, targets)."""

    def __init__(self, lm: torch.nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, x: torch.Tensor, targets: torch.Tensor, history=None) -> tuple[torch.Tensor, dict]:
        logits = self.lm(input_ids=x, use_cache=False).logits  # [B, T, V]; training keeps no KV cache
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten()), {}


def bench_train(cfg: Config, steps: int = 30, warmup: int = 5, dtypes: list[str] | None = None) -> dict:
    """Training steps per dtype the device computes in hardware (float32, and bfloat16 autocast where it has
    bfloat16 units), each as a fraction of the matmul peak in its dtype, and, for a plain model, Hugging Face's
    GPT2LMHeadModel of the same shape trained by the same step beside it. Every figure is timed in alternating rounds
    so that all see the same machine load; each round takes medians, and the best round of each counts. `dtypes`
    (default: train.dtype, then the others the device has) name what is timed; the first is the headline figure
    and the dtype Hugging Face's model trains in."""
    meta = load_meta(cfg.data.dir)
    cfg = resolve(cfg, meta["vocab_size"])
    t = cfg.train
    device = pick_device(t.device)
    set_threads(t.threads)
    torch.manual_seed(t.seed)
    model = build_model(cfg).to(device)
    lay = model.layout
    sampler = WindowSampler(load_split(cfg.data.dir, "train"), lay.token_slots, t.batch_size, t.seed,
                            history=lay.history)
    batches = [tuple(v.to(device) for v in sampler.next_batch()) for _ in range(t.grad_accum)]
    hardware = bf16_hardware(device)
    dtypes = dtypes or [t.dtype, *(d for d in ("float32", "bfloat16") if d != t.dtype and (d == "float32" or hardware))]

    def trainer(net: torch.nn.Module, dtype: str):
        opt, fwd = make_optimizer(net, t, device), torch.compile(net) if t.compile else net
        return lambda: optimizer_step(net, fwd, opt, batches, t.grad_clip, autocast(device, dtype))

    steps_of = {dtype: trainer(model, dtype) for dtype in dtypes}
    hf = hf_gpt2(cfg, device) if lay.plain else None
    if hf is not None:
        steps_of["hf"] = trainer(_HFLoss(hf.train()), dtypes[0])
    first_step_s = _median_time(steps_of[dtypes[0]], device, 1)  # compiling, where train.compile is on
    for step in steps_of.values():
        for _ in range(warmup):
            step()
    peak_of = {dtype: torch.bfloat16 if dtype == "bfloat16" else torch.float32 for dtype in dtypes}
    sizes = {dtype: matmul_peak(device, peak_of[dtype], repeats=3)["n"] for dtype in dtypes}
    rounds = 5
    per_round = max(1, steps // rounds)
    timed = [(f"peak_{d}", lambda d=d: matmul_peak(device, peak_of[d], sizes=(sizes[d],))["flops"]) for d in dtypes]
    timed += [(key, lambda step=step: _median_time(step, device, per_round)) for key, step in steps_of.items()]
    times: dict[str, list[float]] = {key: [] for key, _ in timed}
    for r in range(rounds):  # each round in another order, so that no figure always comes first or last
        for key, measure in timed[r % len(timed):] + timed[: r % len(timed)]:
            times[key].append(measure())
    tokens = t.batch_size * t.grad_accum * lay.token_slots
    by_dtype = {}
    for dtype in dtypes:
        step_s, peak = min(times[dtype]), max(times[f"peak_{dtype}"])
        by_dtype[dtype] = {
            "step_ms": step_s * 1e3,
            "tokens_per_s": tokens / step_s,
            "achieved_flops": tokens / step_s * model.flops_per_token(),
            "matmul_peak_flops": peak,
            "matmul_size": sizes[dtype],
            "fraction_of_peak": tokens / step_s * model.flops_per_token() / peak,
            "fraction_of_peak_medians": tokens / statistics.median(times[dtype]) * model.flops_per_token()
            / statistics.median(times[f"peak_{dtype}"]),
        }
    result = {"bench": "train", "device": str(device), "bf16_hardware": hardware, "dtype": dtypes[0],
              "compile": t.compile, "compile_cache": os.environ.get("TORCHINDUCTOR_CACHE_DIR"),
              "threads": torch.get_num_threads(), "params": model.num_params(),
              "flops_per_token": model.flops_per_token(), "first_step_s": first_step_s, **by_dtype[dtypes[0]],
              "by_dtype": by_dtype, "rounds": rounds}
    if {"float32", "bfloat16"} <= by_dtype.keys():
        result["bf16_speedup"] = by_dtype["bfloat16"]["tokens_per_s"] / by_dtype["float32"]["tokens_per_s"]
    if hf is not None:
        result["hf_tokens_per_s"] = tokens / min(times["hf"])
        result["hf_params"] = sum(p.numel() for p in hf.parameters())
        result["speedup_over_hf"] = result["tokens_per_s"] / result["hf_tokens_per_s"]
    return result


HISTORY_LENGTHS = (1_000, 100_000)
BATCHES = (1, 64)


def hf_gpt2(cfg: Config, device: torch.device, dtype: torch.dtype = torch.float32):
    """A Hugging Face GPT-2 of the config's shape (layers, heads, width, window, vocabulary) with random weights:
    the yardstick a user would otherwise pick. None without the optional extra ('softar[hf]')."""
    from softar.hf_folder import transformers_module

    try:
        transformers = transformers_module()
    except SoftarError:  # the optional extra is not installed
        return None
    m = cfg.model
    conf = transformers.GPT2Config(vocab_size=m.vocab_size, n_positions=m.block_size, n_embd=m.d_model,
                                   n_layer=m.n_layer, n_head=m.n_head, bos_token_id=None, eos_token_id=None,
                                   resid_pdrop=m.dropout, embd_pdrop=m.dropout, attn_pdrop=m.dropout)
    return transformers.GPT2LMHeadModel(conf).eval().to(device, dtype)


def bench_sample_hf(path: str, new_tokens: int = 500, threads: int = 0, repeats: int = 5) -> dict:
    """Greedy batch-1 generation of a Hugging Face model through `softar.decode` (with its cache and without) and
    through the same model's own `generate`, side by side, within one window (neither slides)."""
    from softar.rundir import load_hf

    set_threads(threads)
    device = pick_device("cpu")
    run = load_hf(path, device)
    n = new_tokens
    if n >= run.model.window_slots:  # both must run within one window: softAR's would slide, generate's cannot
        raise SoftarError(f"--new-tokens: at most {run.model.window_slots - 1} for the model in {path} (its "
                          f"{run.model.window_slots} positions hold the prompt token and every new one)")
    prompt = torch.zeros(1, 1, dtype=torch.long, device=device)
    dec = Decoding(HardFeed(Sampling(temperature=0.0)), max_new_tokens=n)
    result = {"bench": "sample", "hf": str(path), "device": str(device), "threads": torch.get_num_threads(),
              "new_tokens": n, "params": run.model.num_params()}
    for key, kw in (("tokens_per_s_batch1", {}), ("tokens_per_s_no_cache", {"use_cache": False})):
        replace(dec, max_new_tokens=min(n, 20)).run(run.model, prompt, **kw)  # warm up
        result[key] = n / _median_time(lambda kw=kw: dec.run(run.model, prompt, **kw), device, repeats)
    hf = run.model.lm.model
    generate = lambda: hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,  # noqa: E731
                                   min_new_tokens=n, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        generate()
        result["hf_tokens_per_s_batch1"] = n / _median_time(generate, device, repeats)
    result["cache_speedup"] = result["tokens_per_s_batch1"] / result["tokens_per_s_no_cache"]
    result["speedup_over_hf_batch1"] = result["tokens_per_s_batch1"] / result["hf_tokens_per_s_batch1"]
    return result


def bench_sample(cfg: Config, new_tokens: int = 500, repeats: int = 5) -> dict:
    """Greedy generation through `softar.decode` from a randomly initialised model of the config's shape, at
    batch 1 and 64 (hard tokens for a plain model; soft tokens for a layout), next to Hugging Face `generate` on a
    GPT-2 of the same shape. A plain model also without its KV cache; a layout per token after 1,000 and 100,000
    tokens of history, with its ladder moving every token (B = 1) and in blocks (B = `context.shift_every`, or the
    soft region's size when that is 1): the block-cached hierarchy must be faster and the same at any history."""
    vocab = load_meta(cfg.data.dir)["vocab_size"] if cfg.model.vocab_size == 0 else cfg.model.vocab_size
    cfg = resolve(cfg, vocab)
    device = pick_device(cfg.train.device)
    set_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed)
    weights = torch.bfloat16 if cfg.train.dtype == "bfloat16" else torch.float32  # decoding needs no float32 master
    model = build_model(cfg).to(device).eval()
    if weights == torch.bfloat16:
        model.to(weights)
    lay = model.layout
    result = {"bench": "sample", "device": str(device), "dtype": cfg.train.dtype, "threads": torch.get_num_threads(),
              "new_tokens": new_tokens, "block_size": cfg.model.block_size, "vocab_size": vocab,
              "params": model.num_params()}
    greedy = Sampling(temperature=0.0)
    feed = HardFeed(greedy) if lay.plain else SoftFeed(noisy=False, sampling=greedy)
    shift = 1 if lay.plain else cfg.context.shift_every if cfg.context.shift_every > 1 else lay.soft or lay.hard
    if not lay.plain:
        result["shift_every"] = shift

    def tokens_per_s(batch: int, n: int, **kw) -> float:
        prompt = torch.zeros(batch, 1, dtype=torch.long, device=device)
        dec = Decoding(feed, max_new_tokens=n)
        replace(dec, max_new_tokens=min(n, 20)).run(model, prompt, shift_every=shift, **kw)  # warm up
        return batch * n / _median_time(lambda: dec.run(model, prompt, shift_every=shift, **kw), device, repeats)

    for b in BATCHES:
        result[f"tokens_per_s_batch{b}"] = tokens_per_s(b, new_tokens)
    if lay.plain:
        result["tokens_per_s_no_cache"] = tokens_per_s(1, new_tokens, use_cache=False)
        result["cache_speedup"] = result["tokens_per_s_batch1"] / result["tokens_per_s_no_cache"]
    hf = hf_gpt2(cfg, device, weights)
    if hf is not None:  # its window cannot slide: both run within one window
        n = min(new_tokens, cfg.model.block_size - 1)
        result["hf_new_tokens"] = n
        for b in BATCHES:
            ids = torch.zeros(b, 1, dtype=torch.long, device=device)
            run = lambda ids=ids: hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,  # noqa: E731
                                              min_new_tokens=n, do_sample=False, pad_token_id=0)
            with torch.inference_mode():
                run()
                result[f"hf_tokens_per_s_batch{b}"] = b * n / _median_time(run, device, repeats)
            result[f"tokens_per_s_batch{b}_hf_length"] = tokens_per_s(b, n)
            result[f"speedup_over_hf_batch{b}"] = result[f"tokens_per_s_batch{b}_hf_length"] / \
                result[f"hf_tokens_per_s_batch{b}"]
    if lay.plain:
        return result
    dec = Decoding(feed, max_new_tokens=new_tokens + 1)
    prompts = {h: torch.randint(vocab, (1, h), generator=torch.Generator().manual_seed(0)).to(device)
               for h in HISTORY_LENGTHS}
    first = replace(dec, max_new_tokens=1)
    for name, b in (("", shift), ("_per_token_hierarchy", 1)):
        per_token: dict[int, list[float]] = {h: [] for h in HISTORY_LENGTHS}
        replace(dec, max_new_tokens=20).run(model, prompts[HISTORY_LENGTHS[0]], shift_every=b)  # warm up
        for _ in range(repeats):  # alternate, so both lengths see the same machine load
            for h, p in prompts.items():
                # the prompt enters the hierarchy once (O(history)); what follows is per token
                t1 = _median_time(lambda p=p, b=b: first.run(model, p, shift_every=b), device, 1)
                tn = _median_time(lambda p=p, b=b: dec.run(model, p, shift_every=b), device, 1)
                per_token[h].append((tn - t1) / new_tokens * 1e3)
        for h in HISTORY_LENGTHS:
            result[f"ms_per_token_history_{h}{name}"] = statistics.median(per_token[h])
        result[f"history_slowdown{name}"] = result[f"ms_per_token_history_{HISTORY_LENGTHS[-1]}{name}"] / \
            result[f"ms_per_token_history_{HISTORY_LENGTHS[0]}{name}"]
    result["block_cache_speedup"] = result[f"ms_per_token_history_{HISTORY_LENGTHS[0]}_per_token_hierarchy"] / \
        result[f"ms_per_token_history_{HISTORY_LENGTHS[0]}"]
    return result
