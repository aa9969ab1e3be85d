"""The study protocol: what `softar sweep` asks of a study. A sweep trains every config x seed; the study says how
each run is scored, which columns and bars its table shows, what else it plots, and the sections of its report. Each
study (soft tokens, layouts, retention, analogies, reasoning, RL) is one subclass in its own module, with these
signatures; `softar.experiments.sweep` holds no study of its own."""

from __future__ import annotations

import io
import statistics
from dataclasses import dataclass
from pathlib import Path

from softar.config import Config
from softar.disk import read_jsonl, write_owned
from softar.evaluate.stats import mean_std
from softar.rundir import METRICS_FILE
from softar.train import Trainer


@dataclass(frozen=True)
class SweepOptions:
    """What a sweep's command line says beyond its configs."""

    out: Path
    seeds: int
    base_seed: int = 1337
    windows: int = 256
    horizons: tuple[int, ...] = (8, 32)
    gap: tuple[str, str] | None = None  # retention: the SHORT and LONG references
    generation: tuple[str, str] | None = None  # layouts: the generator and the plain reference
    analogies: str | None = None  # an analogy file
    paths: dict[str, str] | None = None  # config name -> its file
    overrides: tuple[str, ...] = ()  # section.key=value for every config

    def seed_phrase(self) -> str:
        """"3 seeds (train.seed = 1337, 1338, 1339)", as a report's setup says it."""
        b, n = self.base_seed, self.seeds
        listed = ", ".join(map(str, range(b, b + n))) if n <= 5 else f"{b}, {b + 1}, ..., {b + n - 1}"
        return f"{n} seed{'s' if n > 1 else ''} (train.seed = {listed})"

    def run_dir(self, name: str, s: int) -> Path:
        """The run of config `name` and seed index `s`."""
        return self.out / "runs" / f"{name}_s{self.base_seed + s}"


@dataclass
class Results:
    """What a study reports from: configs by name (the first seed's), each seed's scores (`raw`), the table (mean
    and std over seeds per column) and each seed's run directory."""

    configs: dict[str, Config]
    raw: dict[str, list[dict]]
    table: dict[str, dict[str, tuple[float, float]]]
    dirs: dict[str, list[Path]]


class Study:
    name = ""
    trainer: type[Trainer] = Trainer  # what trains its runs

    def __init__(self, configs: dict[str, Config], options: SweepOptions):
        self.configs, self.options = configs, options

    def check(self) -> None:
        """Before any run: a SoftarError if these configs cannot make this study."""

    def first(self) -> list[str]:
        """Configs whose runs must all be trained before any run is scored (references)."""
        return []

    def evaluate(self, run_dir: Path, cfg: Config, seed: int) -> dict:
        """A finished run's scores (kept as its eval.json)."""
        raise NotImplementedError

    def stale(self, kept: dict, seed: int) -> bool:
        """Whether a run's kept scores (of seed index `seed`) lack what this study reads (it is scored again)."""
        return False

    def columns(self) -> list[str]:
        raise NotImplementedError

    def bar_metrics(self) -> list[str]:
        raise NotImplementedError

    def extra_rows(self) -> dict[str, list[dict]]:
        """Rows the table shows beside the configs' (their eval.json's shape), e.g. the RL runs' starts."""
        return {}

    def plots(self, results: Results) -> list[str]:
        """Write the plots into the sweep's folder -> their file names, in the report's order. By default the
        loss curves and a bar per `bar_metrics` column."""
        plot_losses(results, self.options.out)
        plot_bars(results, self.bar_metrics(), self.options.out)
        return ["loss_curves.png", "metrics.png"]

    def setup(self, results: Results) -> str:
        """The report's setup paragraph ({assets}: its assets folder)."""
        cfg = next(iter(results.configs.values()))
        t, m = cfg.train, cfg.model
        return (f"Every run: {m.n_layer} layers, d_model {m.d_model}, {t.max_iters} steps; window size and batch as "
                f"in each config (the first: block {m.block_size}, batch {t.batch_size}), with the same number of "
                "predicted tokens per step for every config unless its header says otherwise; "
                f"{self.options.seed_phrase()}. Metrics on the val split; sampled ones "
                "on the same random windows for every run. Every metric of every config, mean and standard deviation "
                "over seeds: [results.csv]({assets}/results.csv).")

    def sections(self, results: Results) -> list[str]:
        """The report's own sections, Markdown lines."""
        raise NotImplementedError


def evaluate_lm_run(run_dir: Path, cfg: Config, options: SweepOptions, **extra) -> dict:
    """`softar eval`'s metrics of a language-model run, on the sweep's windows, at the horizons its window holds."""
    from softar.evaluate.run import evaluate_run

    fits = tuple(k for k in options.horizons if k < cfg.model.block_size)  # configs may differ in windows
    return evaluate_run(run_dir, windows=options.windows, horizons=fits, seed=0, device_name=cfg.train.device, **extra)


def save_figure(fig, path: Path, dpi: int = 120) -> None:
    """A matplotlib figure as PNG into a sweep's folder (replacing only a file a sweep wrote), then closed."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    write_owned({path: buf.getvalue()}, f"--out {path.parent}")


def plot_losses(results: Results, out: Path) -> None:
    """loss_curves.png: each config's sampled val loss over steps, mean over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, dirs in results.dirs.items():
        curves = []
        for d in dirs:
            rows = read_jsonl(d / METRICS_FILE, "metrics")[0]
            curves.append({r["step"]: r["val_loss"] for r in rows if r.get("kind") == "eval"
                           and isinstance(r.get("step"), int) and isinstance(r.get("val_loss"), int | float)})
        steps = sorted(set.intersection(*(set(cv) for cv in curves)))
        ax.plot(steps, [statistics.fmean(cv[s] for cv in curves) for s in steps], label=name)
    ax.set(xlabel="step", ylabel="val loss (sampled batches, mean over seeds)", title="Validation loss")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, out / "loss_curves.png")


def plot_bars(results: Results, metrics: list[str], out: Path) -> None:
    """metrics.png: a bar per config for each of `metrics`, with the seed-to-seed standard deviation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = results.table
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.6), squeeze=False)
    names = list(table)
    for ax, metric in zip(axes[0], metrics, strict=True):
        vals = [table[n].get(metric, (float("nan"), 0.0)) for n in names]
        ax.bar(range(len(names)), [v[0] for v in vals], yerr=[v[1] for v in vals], capsize=3)
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
        ax.set_title(metric, fontsize=8)
    fig.tight_layout()
    save_figure(fig, out / "metrics.png")


def analogy_section(raw: dict[str, list[dict]]) -> list[str]:
    """Each config's embedding space on the analogy questions: 3CosAdd against the only-c null, mean ± std over
    seeds, and the questions its vocabulary answers (the rest are skipped)."""
    lines = ["", "## Embedding arithmetic: analogies", "",
             "a : b :: c : ? answered by the token nearest (cosine) to b - a + c, a, b and c excluded (3CosAdd); "
             "`only c`: the token nearest to c alone, the null that uses no arithmetic. Over the questions whose four "
             "words the vocabulary holds as single tokens.", "",
             "| config | answered | skipped | 3CosAdd | only c | 3CosAdd - only c |", "|---|---|---|---|---|---|"]
    for name, runs in raw.items():
        a = [r["analogies"] for r in runs if "analogies" in r]
        if not a or not a[0]["answered"]:
            lines.append(f"| {name} | 0 | {a[0]['skipped'] if a else ''} | | | |")
            continue
        acc, base = mean_std([x["accuracy"] for x in a]), mean_std([x["only_c"] for x in a])
        gain = mean_std([x["accuracy"] - x["only_c"] for x in a])
        lines.append(f"| {name} | {a[0]['answered']} | {a[0]['skipped']} | {acc[0]:.3f} ± {acc[1]:.3f} | "
                     f"{base[0]:.3f} ± {base[1]:.3f} | {gain[0]:+.3f} ± {gain[1]:.3f} |")
    first = next((r[0]["analogies"] for r in raw.values() if r and r[0].get("analogies", {}).get("answered")), None)
    if first is not None:
        lines += ["", "Per section (the first seed of each config, accuracy / only c / answered):", "",
                  "| section | " + " | ".join(raw) + " |", "|---" * (len(raw) + 1) + "|"]
        for sec in first["sections"]:
            cells = []
            for runs in raw.values():
                c = runs[0].get("analogies", {}).get("sections", {}).get(sec, {})
                cells.append(f"{c['accuracy']:.2f} / {c['only_c']:.2f} / {c['answered']}" if c.get("answered")
                             else "")
            lines.append(f"| {sec} | " + " | ".join(cells) + " |")
    return lines + [""]
