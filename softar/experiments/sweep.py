"""`softar sweep`: a grid of configs x seeds at equal budget, then one table (Markdown and CSV, mean ± std over
seeds) and plots (val-loss curves, metric bars with error bars) in one folder.

Each run lives in OUT/runs/<config>_s<seed>; a run whose eval.json exists is not run again, so a sweep can be
resumed, or split over several processes that share OUT and then be reported by one more call."""

from __future__ import annotations

import csv
import signal
import statistics
from pathlib import Path

from softar import SoftarError, config
from softar.disk import read_json, read_jsonl, read_text, strict_json, write_text_atomic
from softar.evaluate.analogies import read_analogies
from softar.evaluate.reasoning import evaluate_task_run
from softar.evaluate.run import evaluate_run
from softar.evaluate.stats import mean_std
from softar.experiments import retention_study, rl_study
from softar.rundir import CONFIG_FILE, METRICS_FILE, RESULT_FILE, RunLock, data_fingerprint, read_config
from softar.soft.model import check_soft_spec
from softar.soft.tokens import heads_of
from softar.train import Preempted, Preemption, Trainer, train

EVAL_FILE = "eval.json"


def flatten(d: dict, prefix: str = "") -> dict[str, float]:
    """{"open_loop": {"8": {"greedy": 1.0}}} -> {"open_loop.8.greedy": 1.0}; numbers only."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        elif isinstance(v, int | float) and not isinstance(v, bool):
            out[key] = float(v)
    return out


def load_config(path: str, overrides: list[str]) -> config.Config:
    """A sweep's config file: an RL run's (an [rl] table naming init_from), merged onto its initial run's config, or
    a training config."""
    raw = config.load_raw(path, overrides)
    if isinstance(raw.get("rl"), dict) and "init_from" in raw["rl"]:
        from softar.rl.trainer import rl_config

        return rl_config(path, overrides)
    return config.load(path, overrides)


def run_one(cfg_path: str, seed: int, overrides: list[str], out: Path, windows: int, horizons: tuple[int, ...],
            quiet: bool = True, gap: tuple[str, str] | None = None, analogies: str | None = None,
            train_only: bool = False) -> dict | None:
    """Train and evaluate one config x seed in OUT/runs/<config>_s<seed>, or reuse what is there when it was made
    with the same resolved config (anything else is refused: a reused run must be the run asked for). `gap`: the
    retention references (`softar eval --gap`), `analogies` an analogy file; a kept result without what they add is
    evaluated again. `train_only`: train (or finish) the run and stop there."""
    run_dir = out / "runs" / f"{Path(cfg_path).stem}_s{seed}"
    cfg = load_config(cfg_path, [*overrides, f"train.seed={seed}"])
    if (run_dir / CONFIG_FILE).is_file():
        changed = config.diff(read_config(run_dir), config.resolve(cfg, data_fingerprint(cfg.data.dir)["vocab_size"]))
        if [k for k in changed if k != "train.lr_decay_iters" or cfg.train.lr_decay_iters]:
            raise SoftarError(f"{run_dir} was made with other settings (differs in {', '.join(changed)}); "
                              "choose another --out")
    is_rl = bool(cfg.rl.init_from)
    if train_only and (run_dir / RESULT_FILE).is_file():  # finished: nothing to take the lock for (another process
        return None                                         # of a split sweep may be scoring it)
    with RunLock(run_dir):
        kept = read_json(run_dir / EVAL_FILE, "sweep result", {"loss": float, "step": int}) \
            if (run_dir / EVAL_FILE).is_file() else None
        stale = kept is not None and (not rl_study.scored_as_now(kept) if is_rl else
                                      gap is not None and not retention_study.scored_as(kept, gap, windows)
                                      or analogies is not None and "analogies" not in kept)
        if kept is not None and not stale:
            return kept
        if kept is None and not (run_dir / RESULT_FILE).is_file():  # a finished run (its config is the one asked for,
            # checked above) is scored, not trained again; so is an RL run scored by an older softar
            if is_rl:
                from softar.rl.trainer import RLTrainer
            result = train(cfg, run_dir, resume=(run_dir / CONFIG_FILE).is_file(), quiet=quiet,
                           trainer=RLTrainer if is_rl else Trainer)
            if result.get("preempted"):
                raise Preempted(signal.Signals[result["signal"]], saved=True,
                                how="run the same softar sweep command again to continue")
        if train_only:
            return None
        if cfg.task.name:  # a reasoning task: the test split, once, with the final checkpoint (chosen on nothing)
            result = evaluate_task_run(run_dir, cfg.task.name, rl_study.test_file(cfg), cfg.train.device)
            if is_rl:  # and pass@k under each inference policy
                result["sampled"] = rl_study.sampled_results(run_dir, cfg)
        else:
            fits = tuple(k for k in horizons if k < cfg.model.block_size)  # configs of a sweep may differ in windows
            result = evaluate_run(run_dir, windows=windows, horizons=fits, seed=0, device_name=cfg.train.device,
                                  gap_runs=gap, arrays_out=run_dir / retention_study.ARRAYS_FILE if gap else None,
                                  # the retention study reads neither a plain run's soft-output metrics nor a new
                                  # pass over the whole split (the run's own final one stands)
                                  analogies=analogies, soft_metrics=gap is None, whole_split=gap is None)
        write_text_atomic(run_dir / EVAL_FILE, strict_json(result, indent=2))
    return result


def check_init_runs(configs: list[str], loaded: dict[str, config.Config], overrides: list[str], out: Path,
                    seeds: int, base_seed: int) -> None:
    """Before any run: every seed's `train.init_from` is a finished run, or a run of a config listed earlier in
    this sweep (which trains first)."""
    earlier: set[Path] = set()
    for c in configs:
        name = Path(c).stem
        raw = config.load_raw(c, overrides).get("train") or {}
        template = raw.get("init_from", "") if isinstance(raw, dict) else ""
        for s in range(seeds):
            if template:
                init = Path(config.seeded(template, base_seed + s))
                if init.resolve() not in earlier and not (init / RESULT_FILE).is_file():
                    raise SoftarError(f"{c}: train.init_from {init} is neither a finished run nor a run of a config "
                                      "listed before it in this sweep")
            earlier.add((out / "runs" / f"{name}_s{base_seed + s}").resolve())


def sweep(configs: list[str], seeds: int, overrides: list[str], out: Path, windows: int = 256,
          horizons: tuple[int, ...] = (8, 32), base_seed: int = 1337, columns: list[str] | None = None,
          report: Path | None = None, command: str = "", gap: tuple[str, str] | None = None,
          generation: tuple[str, str] | None = None, analogies: str | None = None) -> dict:
    """Run (or reuse) every config x seed, then tabulate. `gap` = (SHORT, LONG), plain config names, each
    optionally NAME:CONTEXT, makes it the retention study (`softar.experiments.retention_study`): every run scored
    on identical targets against those references; `generation` = (generator, reference) adds the
    collapse-threshold trade-off of the generator's runs scored by the reference's (see
    `softar.experiments.context_study`). Either makes the report a context study instead of the soft-token one."""
    from softar.experiments import context_study, reasoning_study, soft_study

    stems = [Path(c).stem for c in configs]
    if len(set(stems)) != len(stems):
        raise SoftarError(f"sweep: config names must differ (runs are named after them): {', '.join(stems)}")
    for name in generation or ():
        if name not in stems:
            raise SoftarError(f"sweep --generation: {name!r} is not one of the configs ({', '.join(stems)})")
    # fail on a bad config before any run (as the first seed's run will load it)
    loaded = {Path(c).stem: load_config(c, [*overrides, f"train.seed={base_seed}"]) for c in configs}
    refs = retention_study.parse_gap(gap, loaded) if gap is not None else None
    check_init_runs(configs, loaded, overrides, out, seeds, base_seed)
    for cfg in loaded.values():
        check_soft_spec(cfg.soft, heads_of(cfg.model))
    is_rl = [bool(cfg.rl.init_from) for cfg in loaded.values()]
    if any(is_rl) and not all(is_rl):
        raise SoftarError("sweep: RL configs and training configs go in separate sweeps")
    if all(is_rl):
        rl_study.check_grid(loaded)
        inits = {name: [Path(config.seeded(config.load_raw(c, overrides)["rl"]["init_from"], base_seed + s))
                        for s in range(seeds)] for name, c in zip(loaded, configs, strict=True)}
        for d in {d for dirs in inits.values() for d in dirs}:  # every seed's start exists before a run trains
            read_config(d)
    reasoning = any(cfg.task.name for cfg in loaded.values())
    if reasoning and not all(cfg.task.name for cfg in loaded.values()):
        raise SoftarError("sweep: reasoning-task configs and language-model configs go in separate sweeps")
    if (reasoning or any(is_rl)) and (gap or generation or analogies):
        raise SoftarError("sweep: --gap, --generation and --analogies are for language-model configs, not reasoning "
                          "tasks")
    if analogies is not None:
        read_analogies(analogies)  # a bad file fails before any run
    if generation is not None and not loaded[generation[1]].context.plain:
        raise SoftarError(f"sweep --generation: the reference {generation[1]!r} has a context layout; it must be a "
                          "plain hard-token config")
    if generation is not None and loaded[generation[0]].context.plain:
        raise SoftarError(f"sweep --generation: the generator {generation[0]!r} has no context layout; the "
                          "trade-off is measured on a layout config")
    if report is not None:
        check_report(report, out)
    claim_out(out)
    raw: dict[str, list[dict]] = {}
    with Preemption():  # a signal outside training (evaluation, reports) stops at once; finished runs are kept
        for name in dict.fromkeys(name for name, _ in refs or ()):  # every seed's references train before anything
            for s in range(seeds):                                   # is scored against them
                run_one(next(c for c in configs if Path(c).stem == name), base_seed + s, overrides, out, windows,
                        horizons, train_only=True)
        for c in configs:
            raw[Path(c).stem] = [run_one(c, base_seed + s, overrides, out, windows, horizons,
                                         gap=retention_study.gap_specs(refs, out, base_seed + s) if refs else None,
                                         analogies=analogies) for s in range(seeds)]
    rows = {name: [flatten(r) for r in runs] for name, runs in raw.items()}
    if all(is_rl):
        dirs = {name: [out / "runs" / f"{name}_s{base_seed + s}" for s in range(seeds)] for name in raw}
        with Preemption():
            starts = {}
            for name, cfg in loaded.items():  # one start per task (`check_grid`): its configs share their starts
                if cfg.task.name not in starts:
                    starts[cfg.task.name] = rl_study.start_results(inits[name], cfg, out)
        for task, runs in starts.items():
            rows[rl_study.start_name(task)] = [flatten(r) for r in runs]
        columns = rl_study.columns()
        table = {name: {col: mean_std([r[col] for r in runs if col in r]) for col in columns
                        if any(col in r for r in runs)} for name, runs in rows.items()}
        write_tables(table, columns, out)
        rl_study.plot_curves(dirs, loaded, out)
        if report is not None:
            write_report(report, command, configs, overrides, seeds, table, out,
                         rl_study.report_sections(raw, loaded, starts), ["reward_curves.png"], setup=rl_study.SETUP)
        return {"sweep": str(out), "configs": [Path(c).stem for c in configs], "seeds": seeds,
                "table": {n: {c: list(v) for c, v in cols.items()} for n, cols in table.items()}}
    if reasoning:
        table = {name: {col: mean_std([r[col] for r in runs if col in r]) for col in reasoning_study.columns()
                        if any(col in r for r in runs)} for name, runs in rows.items()}
        write_tables(table, reasoning_study.columns(), out)
        plot(configs, seeds, base_seed, table, out, reasoning_study.BAR_METRICS)
        reasoning_study.plot_accuracy(list(table), seeds, base_seed, out, loaded)
        if report is not None:
            write_report(report, command, configs, overrides, seeds, table, out,
                         reasoning_study.report_sections(table, raw, loaded),
                         ["loss_curves.png", "accuracy_curves.png", "metrics.png"], setup=reasoning_study.SETUP)
        return {"sweep": str(out), "configs": [Path(c).stem for c in configs], "seeds": seeds,
                "table": {n: {c: list(v) for c, v in cols.items()} for n, cols in table.items()}}
    study = gap is not None or generation is not None
    columns = columns or (retention_study.COLUMNS if gap else context_study.COLUMNS if study
                          else soft_study.columns(horizons))
    table = {name: {col: mean_std([r[col] for r in runs if col in r]) for col in columns
                    if any(col in r for r in runs)} for name, runs in rows.items()}
    write_tables(table, columns, out)
    plot(configs, seeds, base_seed, table, out, retention_study.BAR_METRICS if gap else
         context_study.BAR_METRICS if study else soft_study.bar_metrics(horizons))
    tradeoff = None
    if generation is not None:
        tradeoff = context_study.tradeoff(out, *generation, seeds, base_seed)
    pngs = ["loss_curves.png", "metrics.png"] + (["tradeoff.png"] if tradeoff else [])
    setup = None
    if gap is not None:
        dirs = {name: [out / "runs" / f"{name}_s{base_seed + s}" for s in range(seeds)] for name in raw}
        retention_study.plot_context_curve(raw, dirs, refs, out)
        pngs.insert(0, "context_curve.png")
        setup = retention_study.setup(loaded, raw, seeds)
    if report is not None:
        sections = []
        if gap is not None:
            sections += retention_study.report_sections(table, raw, loaded, dirs, refs)
        if generation is not None:
            sections += context_study.report_sections(table, generation, tradeoff)
        elif gap is None and analogies is None:  # an analogy sweep reports the analogies alone
            sections += soft_study.report_sections(table, raw, horizons)
        if analogies is not None:
            sections += retention_study.analogy_section(raw)
        write_report(report, command, configs, overrides, seeds, table, out, sections, pngs, setup=setup)
    return {"sweep": str(out), "configs": [Path(c).stem for c in configs], "seeds": seeds,
            "table": {n: {c: list(v) for c, v in cols.items()} for n, cols in table.items()}}


def write_tables(table: dict, columns: list[str], out: Path) -> None:
    used = [c for c in columns if any(c in cols for cols in table.values())]
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["config"] + [f"{c} {s}" for c in used for s in ("mean", "std")])
        for name, cols in table.items():
            w.writerow([name] + [f"{x:.6g}" if c in cols else "" for c in used for x in cols.get(c, (0, 0))])
    lines = ["| config | " + " | ".join(used) + " |", "|---" * (len(used) + 1) + "|"]
    for name, cols in table.items():
        cells = [f"{cols[c][0]:.4g} ± {cols[c][1]:.2g}" if c in cols else "" for c in used]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    (out / "results.md").write_text("\n".join(lines) + "\n")


def plot(configs: list[str], seeds: int, base_seed: int, table: dict, out: Path, metrics: list[str]) -> None:
    """loss_curves.png (sampled val loss over steps, mean over seeds) and metrics.png (a bar per config for each
    of `metrics`, with the seed-to-seed standard deviation)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for c in configs:
        name = Path(c).stem
        curves = []
        for s in range(seeds):
            path = out / "runs" / f"{name}_s{base_seed + s}" / METRICS_FILE
            rows = read_jsonl(path, "metrics")[0]
            curves.append({r["step"]: r["val_loss"] for r in rows if r.get("kind") == "eval"
                           and isinstance(r.get("step"), int) and isinstance(r.get("val_loss"), int | float)})
        steps = sorted(set.intersection(*(set(cv) for cv in curves)))
        ax.plot(steps, [statistics.fmean(cv[s] for cv in curves) for s in steps], label=name)
    ax.set(xlabel="step", ylabel="val loss (sampled batches, mean over seeds)", title="Validation loss")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.6))
    names = list(table)
    for ax, metric in zip(axes, metrics, strict=True):
        vals = [table[n].get(metric, (float("nan"), 0.0)) for n in names]
        ax.bar(range(len(names)), [v[0] for v in vals], yerr=[v[1] for v in vals], capsize=3)
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
        ax.set_title(metric, fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "metrics.png", dpi=120)
    plt.close(fig)


SWEEP_MARK = ".softar-sweep"  # in every --out a sweep made: what it may overwrite there is its own
SWEEP_DIRS = {"runs", rl_study.STARTS}
SWEEP_FILES = {"results.md", "results.csv", "loss_curves.png", "metrics.png", "tradeoff.png", "accuracy_curves.png",
               "reward_curves.png", "context_curve.png", "sweep.json", SWEEP_MARK} | SWEEP_DIRS
REPORT_MARK = "<!-- written by softar sweep -->"


def claim_out(out: Path) -> None:
    """A sweep writes its tables and plots into --out: only into a new or empty folder, or one a sweep made."""
    if out.is_symlink() or out.exists() and not out.is_dir():
        raise SoftarError(f"--out {out} exists and is not a directory")
    if out.is_dir() and not (out / SWEEP_MARK).is_file():
        names = {p.name for p in out.iterdir()}  # a sweep's output from before the mark existed holds runs/
        foreign = sorted(names - SWEEP_FILES if "runs" in names else names)
        if foreign:
            raise SoftarError(f"--out {out} holds files a sweep did not make ({', '.join(foreign[:3])}"
                              f"{' ...' if len(foreign) > 3 else ''}); choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / SWEEP_MARK).touch()
    except OSError as e:
        raise SoftarError(f"--out {out}: cannot write there ({e.strerror or e})") from None
    for name in SWEEP_FILES - {SWEEP_MARK}:
        path, kind = out / name, ("folder", Path.is_dir) if name in SWEEP_DIRS else ("plain file", Path.is_file)
        if path.is_symlink() or path.exists() and not kind[1](path):
            raise SoftarError(f"--out {out}: {name} is not a {kind[0]} a sweep wrote")


REPORT_ASSETS = {"loss_curves.png", "metrics.png", "tradeoff.png", "accuracy_curves.png", "reward_curves.png",
                 "context_curve.png", "results.csv"}


def check_report(path: Path, out: Path) -> None:
    """--report overwrites only a report a sweep wrote (its first line `# Results:` or the mark at its end), and its
    assets folder (beside it, named after it) must be new or hold only a report's assets and not be --out. Checked
    before any run, so a sweep never trains for a report it cannot write."""
    if path.is_symlink() or path.exists() and not path.is_file():
        raise SoftarError(f"--report {path} is not a plain file")
    if path.parent.exists() and not path.parent.is_dir():
        raise SoftarError(f"--report {path}: {path.parent} is not a directory")
    if path.is_file():
        text = read_text(path, "report")
        if not (text.startswith("# Results:") or REPORT_MARK in text):
            raise SoftarError(f"--report {path} exists and is not a report softar sweep wrote; choose another file")
    assets = path.parent / path.stem
    if assets.resolve() == out.resolve():
        raise SoftarError(f"--report {path}: its assets folder {assets} would be --out itself; choose another name")
    if assets.is_symlink() or assets.exists() and not assets.is_dir():
        raise SoftarError(f"--report {path}: {assets} (its assets folder) exists and is not a directory")
    if assets.is_dir() and not path.is_file():
        raise SoftarError(f"--report {path}: {assets} (its assets folder) already exists without the report that "
                          "owns it; choose another name")
    if assets.is_dir():
        foreign = sorted(p.name for p in assets.iterdir() if p.name not in REPORT_ASSETS or not p.is_file())
        if foreign:
            raise SoftarError(f"--report {path}: {assets} holds files a sweep did not write ({', '.join(foreign[:3])}"
                              f"{' ...' if len(foreign) > 3 else ''}); choose another name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SoftarError(f"--report {path}: cannot write there ({e.strerror or e})") from None


def write_report(path: Path, command: str, configs: list[str], overrides: list[str], seeds: int, table: dict,
                 out: Path, sections: list[str], pngs: list[str], setup: str | None = None) -> None:
    """A Markdown report: the command that regenerates it, the setup (`setup`, or the language-model studies'
    one), the plots (copied beside it), then the study's own sections."""
    import shutil

    path.parent.mkdir(parents=True, exist_ok=True)
    assets = path.parent / path.stem
    assets.mkdir(exist_ok=True)
    for name in (*pngs, "results.csv"):
        shutil.copy(out / name, assets / name)
    if setup is None:
        cfg = config.load(configs[0], overrides)
        t, m = cfg.train, cfg.model
    setup = setup or (
        f"Every run: {m.n_layer} layers, d_model {m.d_model}, {t.max_iters} steps; window size and batch as in "
        f"each config (the first: block {m.block_size}, batch {t.batch_size}), with the same number of predicted "
        f"tokens per step for every config unless its header says otherwise; {seeds} seeds (train.seed = 1337, "
        "1338, ...). Metrics on the val split; sampled ones on the same random windows for every run. Every "
        "metric of every config, mean and standard deviation over seeds: [results.csv]({assets}/results.csv).")
    text = [
        f"# Results: {', '.join(Path(c).stem for c in configs)}",
        "",
        "Regenerate this page (CPU, 2 cores) with:",
        "",
        "```bash",
        command or "softar sweep ...",
        "```",
        "",
        setup.replace("{assets}", assets.name),
        "",
        *[f"![{png[:-4]}]({assets.name}/{png})\n" for png in pngs],
        *sections,
        "",
        REPORT_MARK,
    ]
    write_text_atomic(path, "\n".join(text) + "\n")
