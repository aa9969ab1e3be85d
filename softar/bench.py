"""`softar bench`: training throughput as a fraction of a matmul peak measured in the same process, and
generation speed with and without the KV cache. Figures are medians over repeated timings."""

from __future__ import annotations

import statistics
import time
from dataclasses import replace

import torch

from softar import SoftarError
from softar.config import Config, resolve
from softar.data.dataset import WindowSampler, load_meta, load_split
from softar.decode import Decoding
from softar.device import autocast, pick_device, set_threads
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
BATCHES = (1, 64)


def hf_gpt2(cfg: Config, device: torch.device):
    """A Hugging Face GPT-2 of the config's shape (layers, heads, width, window, vocabulary) with random weights:
    the yardstick a user would otherwise pick. None without the optional extra ('softar[hf]')."""
    from softar.hf_folder import transformers_module

    try:
        transformers = transformers_module()
    except SoftarError:  # the optional extra is not installed
        return None
    m = cfg.model
    conf = transformers.GPT2Config(vocab_size=m.vocab_size, n_positions=m.block_size, n_embd=m.d_model,
                                   n_layer=m.n_layer, n_head=m.n_head, bos_token_id=None, eos_token_id=None)
    return transformers.GPT2LMHeadModel(conf).eval().to(device)


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
    model = build_model(cfg).to(device).eval()
    lay = model.layout
    result = {"bench": "sample", "device": str(device), "threads": torch.get_num_threads(), "new_tokens": new_tokens,
              "block_size": cfg.model.block_size, "vocab_size": vocab, "params": model.num_params()}
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
    hf = hf_gpt2(cfg, device)
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
