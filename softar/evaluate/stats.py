"""The statistics every comparison uses: paired bootstrap intervals, standard errors over windows, and a fitted
softmax temperature."""

from __future__ import annotations

import statistics

import numpy as np


def paired_bootstrap(a, b, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict[str, float]:
    """The mean of a - b over paired units (windows, or seeds x windows) with a percentile bootstrap interval that
    resamples the units: {"diff", "lo", "hi"}. A difference whose interval excludes 0 is resolved."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if d.ndim != 1 or d.size == 0:
        raise ValueError("paired_bootstrap needs two equal-length, non-empty 1-d samples")
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(n_boot, d.size))].mean(1)
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return {"diff": float(d.mean()), "lo": float(lo), "hi": float(hi)}


def paired_bootstrap_2way(a, b, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict[str, float]:
    """The mean of a - b over [seeds, windows] arrays in which every seed saw the same windows: the bootstrap
    resamples seeds and, shared across them, windows, so neither the seed-to-seed variation nor the windows' own is
    counted as independent evidence. {"diff", "lo", "hi"}; with few seeds the seed part stays under-covered."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if d.ndim != 2 or d.size == 0:
        raise ValueError("paired_bootstrap_2way needs two equal-shape, non-empty [seeds, windows] arrays")
    rng = np.random.default_rng(seed)
    S, W = d.shape
    means = np.empty(n_boot)
    for i in range(n_boot):
        means[i] = d[rng.integers(0, S, S)][:, rng.integers(0, W, W)].mean()
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return {"diff": float(d.mean()), "lo": float(lo), "hi": float(hi)}


def mean_std(values) -> tuple[float, float]:
    """Mean and standard deviation over runs (seeds); one run has spread 0."""
    values = list(values)
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def mean_se(x) -> tuple[float, float]:
    """Mean and standard error of independent units (one value per window); one unit has no error estimate
    (inf)."""
    x = np.asarray(x, dtype=np.float64)
    return float(x.mean()), float(x.std(ddof=1) / np.sqrt(x.size)) if x.size > 1 else float("inf")


def resolved(mean: float, se: float) -> bool:
    """Whether a 95% normal interval around `mean` excludes 0."""
    return bool(np.isfinite(se)) and abs(mean) > 1.96 * se


def at_bound(tau: float, lo: float = 1e-4, hi: float = 1e4) -> bool:
    """Whether a fitted temperature sits at an end of its search range (the data asked for more: a model that
    puts all its mass on one token, say), so it is a bound rather than an optimum."""
    return not lo * 1.01 < tau < hi / 1.01
