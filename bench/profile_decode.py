"""Where a decode step's time goes: torch.profiler over `softar.decode` on a randomly initialised model of a
config's shape, greedy, after a warm-up. Prints the operators by self CPU time (the table in docs/performance.md).

    python bench/profile_decode.py softar/configs/shakespeare_char.toml --batch 1 --threads 1
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from softar import config
from softar.data.dataset import load_meta
from softar.decode import decode
from softar.soft.collapse import Sampling
from softar.soft.feeds import HardFeed, SoftFeed
from softar.soft.model import build_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--tokens", type=int, default=300)
    p.add_argument("--threads", type=int, default=0, help="0: torch's default")
    p.add_argument("--shift-every", type=int, default=None, help="layouts: the ladder's block (default: the config's)")
    p.add_argument("--rows", type=int, default=20)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = config.load(a.config, [])
    cfg = config.resolve(cfg, cfg.model.vocab_size or load_meta(cfg.data.dir)["vocab_size"])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    prompt = torch.zeros(a.batch, 1, dtype=torch.long)
    greedy = Sampling(temperature=0.0)
    feed = HardFeed(greedy) if model.layout.plain else SoftFeed(noisy=False, sampling=greedy)
    decode(model, prompt, feed, a.tokens, shift_every=a.shift_every)  # warm up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        decode(model, prompt, feed, a.tokens, shift_every=a.shift_every)
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    print(f"{cfg.model.n_layer} layers, d {cfg.model.d_model}, batch {a.batch}, {torch.get_num_threads()} threads: "
          f"{total / a.tokens / 1e3:.3f} ms of operator time per step (profiler overhead included)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.rows))


if __name__ == "__main__":
    main()
