"""Does bfloat16 autocast train as well as float32? Trains one config under both dtypes with the same seeds (the same
initial weights and batches), then prints the final whole-val losses, their paired differences with a t interval
over seeds (1337, 1338, ...), and each run's training tokens/s (docs/performance.md, "bfloat16 on CPU").

    python bench/dtype_quality.py softar/configs/shakespeare_char.toml --seeds 3 --out runs/dtype_char
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from softar import SoftarError, config
from softar.device import bf16_hardware, pick_device
from softar.train import train

# two-sided 95% quantiles of Student's t by degrees of freedom (seeds - 1)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="section.key=value, for both dtypes")
    p.add_argument("--seeds", type=int, default=3, choices=range(2, 11), metavar="2..10")
    p.add_argument("--out", required=True, help="a new folder: OUT/<dtype>_s<seed> per run")
    a = p.parse_args()
    out = Path(a.out)
    if out.exists():
        p.error(f"--out {out} exists; give a new folder")
    try:  # a bad config or override: one line, before anything is written
        config.load(a.config, a.overrides)
    except SoftarError as e:
        p.error(str(e))
    out.mkdir(parents=True)
    runs: dict[str, list[dict]] = {"float32": [], "bfloat16": []}
    for i in range(a.seeds):
        for dtype, done in runs.items():
            cfg = config.load(a.config, [*a.overrides, f"train.dtype={dtype}", f"train.seed={1337 + i}"])
            r = train(cfg, out / f"{dtype}_s{cfg.train.seed}", quiet=True)
            done.append({"seed": cfg.train.seed, "val_loss": r["val_loss"], "tokens_per_s": r["tokens_per_s"]})
    diffs = [b["val_loss"] - f["val_loss"] for f, b in zip(runs["float32"], runs["bfloat16"], strict=True)]
    mean, half = statistics.mean(diffs), T975[len(diffs) - 1] * statistics.stdev(diffs) / len(diffs) ** 0.5
    speed = [b["tokens_per_s"] / f["tokens_per_s"] for f, b in zip(runs["float32"], runs["bfloat16"], strict=True)]
    result = {"config": a.config, "overrides": a.overrides, "runs": runs,
              "bf16_hardware": bf16_hardware(pick_device(cfg.train.device)),
              "val_loss_bf16_minus_fp32": mean, "ci95": [mean - half, mean + half],
              "train_speedup_bf16_median": statistics.median(speed)}
    (out / "dtype_quality.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
