"""`softar sweep`: a grid of configs x seeds at equal budget, then one table (Markdown and CSV, mean ± std over
seeds) and plots (val-loss curves, metric bars with error bars) in one folder.

Each run lives in OUT/runs/<config>_s<seed>; a run whose eval.json exists is not run again, so a sweep can be
resumed, or split over several processes that share OUT and then be reported by one more call."""

from __future__ import annotations

import csv
import ctypes
import io
import multiprocessing
import os
import signal
from multiprocessing.connection import Connection, wait
from pathlib import Path

from softar import Preempted, SoftarError, config
from softar.disk import claim, make_folder, read_json, strict_json, write_owned, write_text_atomic
from softar.evaluate.analogies import read_analogies
from softar.evaluate.stats import mean_std
from softar.experiments import rl_study
from softar.experiments.study import Results, Study, SweepOptions
from softar.rundir import CONFIG_FILE, RESULT_FILE, RunLock, data_fingerprint, read_config
from softar.soft.model import check_names
from softar.train import Preemption, train

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


def run_one(cfg_path: str, seed: int, overrides: list[str], study: Study, train_only: bool = False,
            quiet: bool = True) -> dict | None:
    """Train and score one config x seed index in OUT/runs/<config>_s<seed>, or reuse what is there when it was
    made with the same resolved config (anything else is refused: a reused run must be the run asked for). A kept
    score the study finds stale is scored again. `train_only`: train (or finish) the run and stop there."""
    o = study.options
    run_dir = o.run_dir(Path(cfg_path).stem, seed)
    cfg = load_config(cfg_path, [*overrides, f"train.seed={o.base_seed + seed}"])
    if (run_dir / CONFIG_FILE).is_file():
        changed = config.diff(read_config(run_dir), config.resolve(cfg, data_fingerprint(cfg.data.dir)["vocab_size"]))
        if [k for k in changed if k != "train.lr_decay_iters" or cfg.train.lr_decay_iters]:
            raise SoftarError(f"{run_dir} was made with other settings (differs in {', '.join(changed)}); "
                              "choose another --out")
    if train_only and (run_dir / RESULT_FILE).is_file():  # finished: nothing to take the lock for (another process
        return None                                         # of a split sweep may be scoring it)
    with RunLock(run_dir):
        kept = read_json(run_dir / EVAL_FILE, "sweep result", {"loss": float, "step": int}) \
            if (run_dir / EVAL_FILE).is_file() else None
        if kept is not None and not study.stale(kept, seed):
            return kept
        if kept is None and not (run_dir / RESULT_FILE).is_file():  # a finished run (its config is the one asked for,
            # checked above) is scored, not trained again
            result = train(cfg, run_dir, resume=(run_dir / CONFIG_FILE).is_file(), quiet=quiet, trainer=study.trainer)
            if result.get("preempted"):
                raise Preempted(signal.Signals[result["signal"]], saved=True,
                                how="run the same softar sweep command again to continue")
        if train_only:
            return None
        result = study.evaluate(run_dir, cfg, seed)
        write_text_atomic(run_dir / EVAL_FILE, strict_json(result, indent=2))
    return result


def init_run(cfg_path: str, s: int, overrides: list[str], options: SweepOptions) -> Path | None:
    """The run that config x seed index `s` starts from (its `train.init_from`, seeded), if any."""
    raw = config.load_raw(cfg_path, overrides).get("train") or {}
    template = raw.get("init_from", "") if isinstance(raw, dict) else ""
    return Path(config.seeded(template, options.base_seed + s)) if template else None


def check_init_runs(configs: list[str], overrides: list[str], options: SweepOptions) -> None:
    """Before any run: every seed's `train.init_from` is a finished run, or a run of a config listed earlier in
    this sweep (which trains first)."""
    earlier: set[Path] = set()
    for c in configs:
        for s in range(options.seeds):
            init = init_run(c, s, overrides, options)
            if init is not None and init.resolve() not in earlier and not (init / RESULT_FILE).is_file():
                raise SoftarError(f"{c}: train.init_from {init} is neither a finished run nor a run of a config "
                                  "listed before it in this sweep")
            earlier.add(options.run_dir(Path(c).stem, s).resolve())


def _die_with_parent(parent: int) -> None:
    """Linux: SIGTERM this process when the sweep that started it dies, however it dies (kill -9, out of memory), so
    that the run saves and stops rather than training on, orphaned, holding its lock."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: an orphan finishes its run
        return
    if os.getppid() != parent:  # the sweep died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _train_worker(cfg_path: str, s: int, overrides: list[str], study: Study, conn: Connection, parent: int) -> None:
    """One run of `train_runs`, in its own process: trains it and tells the sweep how it ended, in one line."""
    try:
        _die_with_parent(parent)
        run_one(cfg_path, s, overrides, study, train_only=True)
        conn.send(None)
    except Preempted as e:
        conn.send(("preempted", int(e.signum)))
    except SoftarError as e:
        conn.send(("error", str(e)))
    except Exception as e:  # a bug: still one line for the sweep to report
        conn.send(("error", f"{type(e).__name__}: {e}"))


def train_runs(configs: list[str], overrides: list[str], study: Study, jobs: int, stop: Preemption) -> None:
    """Train every config x seed, up to `jobs` runs at once, each in its own process (with its config's
    train.threads); a run that starts from another run of this sweep (train.init_from) waits for it. A signal
    (`stop` notes it) or a failed run stops the others, which finish their step and save, to resume on the next
    call."""
    o = study.options
    runs = {o.run_dir(Path(c).stem, s).resolve(): (c, s) for c in configs for s in range(o.seeds)}
    needs = {key: init_run(c, s, overrides, o) for key, (c, s) in runs.items()}
    needs = {key: init.resolve() if init is not None and init.resolve() in runs and init.resolve() != key
             and not (init / RESULT_FILE).is_file() else None for key, init in needs.items()}  # finished: no wait
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch thread pools
    waiting, running, done = dict(runs), {}, set()
    stop.set_immediate(False)  # a signal is noted, and acted on between two waits: no child goes untracked
    try:
        while waiting or running:
            ready = [k for k in waiting if needs[k] is None or needs[k] in done]
            if not ready and not running:  # cannot happen after check_init_runs; never wait on nothing
                raise SoftarError(f"sweep: {next(iter(waiting))} waits on a run that never trains")
            for key in ready[:jobs - len(running)]:
                c, s = waiting.pop(key)
                receive, send = ctx.Pipe(duplex=False)
                proc = ctx.Process(target=_train_worker, args=(c, s, overrides, study, send, os.getpid()))
                proc.start()
                send.close()
                running[proc.sentinel] = (key, proc, receive)
            for sentinel in wait(list(running), timeout=0.2):
                key, proc, receive = running.pop(sentinel)
                proc.join()
                try:
                    ended = receive.recv()
                except EOFError:  # it died before telling (killed, or a bug whose traceback it printed)
                    ended = ("error", f"its process exited with code {proc.exitcode}")
                if ended is None:
                    done.add(key)
                    continue
                if ended[0] == "preempted":
                    stop.signum = ended[1]
                    break
                run = o.run_dir(Path(runs[key][0]).stem, runs[key][1])
                raise SoftarError(ended[1] if str(run) in ended[1] else f"{run}: {ended[1]}")
            if stop.signum is not None:
                raise Preempted(stop.signum, saved=True, how="run the same softar sweep command again to continue")
    finally:  # SIGTERM: a training run finishes its step and saves its checkpoint
        for _, proc, _ in running.values():
            proc.terminate()
        for _, proc, _ in running.values():
            proc.join()
    stop.set_immediate(True)


def choose_study(loaded: dict[str, config.Config], options: SweepOptions) -> Study:
    """The study a sweep's configs and options make: RL configs, reasoning-task configs, or language-model configs
    (retention with --gap, layouts with --generation, soft tokens otherwise)."""
    from softar.experiments.context_study import LayoutStudy
    from softar.experiments.reasoning_study import ReasoningStudy
    from softar.experiments.retention_study import RetentionStudy
    from softar.experiments.rl_study import RLStudy
    from softar.experiments.soft_study import SoftTokenStudy

    is_rl = [bool(cfg.rl.init_from) for cfg in loaded.values()]
    if any(is_rl) and not all(is_rl):
        raise SoftarError("sweep: RL configs and training configs go in separate sweeps")
    tasks = [bool(cfg.task.name) for cfg in loaded.values()]
    if any(tasks) and not all(tasks):
        raise SoftarError("sweep: reasoning-task configs and language-model configs go in separate sweeps")
    if all(tasks) and (options.gap or options.generation or options.analogies):
        raise SoftarError("sweep: --gap, --generation and --analogies are for language-model configs, not reasoning "
                          "tasks")
    kind = RLStudy if all(is_rl) else ReasoningStudy if all(tasks) else RetentionStudy if options.gap else \
        LayoutStudy if options.generation else SoftTokenStudy
    return kind(loaded, options)


def sweep(configs: list[str], seeds: int, overrides: list[str], out: Path, windows: int = 256,
          horizons: tuple[int, ...] = (8, 32), base_seed: int = 1337, report: Path | None = None, command: str = "",
          gap: tuple[str, str] | None = None, generation: tuple[str, str] | None = None,
          analogies: str | None = None, jobs: int = 1) -> dict:
    """Run (or reuse) every config x seed, then tabulate, plot and report as the study the configs make
    (`choose_study`): `gap` = (SHORT, LONG), plain config names, each optionally NAME:CONTEXT, makes it the
    retention study; `generation` = (generator, reference) the layout study's coherence trade-off; `analogies` adds
    the analogy section."""
    stems = [Path(c).stem for c in configs]
    if base_seed + seeds > 2**32:  # torch's CPU generator keeps 32 bits: a larger seed would alias a smaller one
        raise SoftarError(f"sweep: --first-seed {base_seed} with --seeds {seeds} runs past train.seed 2**32 - 1")
    if len(set(stems)) != len(stems):
        raise SoftarError(f"sweep: config names must differ (runs are named after them): {', '.join(stems)}")
    # fail on a bad config before any run (as the first seed's run will load it)
    loaded = {Path(c).stem: load_config(c, [*overrides, f"train.seed={base_seed}"]) for c in configs}
    options = SweepOptions(out, seeds, base_seed, windows, horizons, gap, generation, analogies,
                           dict(zip(stems, configs, strict=True)), tuple(overrides))
    study = choose_study(loaded, options)
    study.check()
    check_init_runs(configs, overrides, options)
    for cfg in loaded.values():
        check_names(cfg)
    if analogies is not None:
        read_analogies(analogies)  # a bad file fails before any run
    if report is not None:
        check_report(report, out)
    claim_out(out)
    with Preemption() as stop:  # a signal outside training (evaluation, reports) stops at once; finished runs kept
        if jobs > 1:
            train_runs(configs, overrides, study, jobs, stop)
        for name in study.first():  # every seed's references train before anything is scored against them
            for s in range(seeds):
                run_one(options.paths[name], s, overrides, study, train_only=True)
        raw = {Path(c).stem: [run_one(c, s, overrides, study) for s in range(seeds)] for c in configs}
        rows = {name: [flatten(r) for r in runs] for name, runs in {**raw, **study.extra_rows()}.items()}
    columns = study.columns()
    table = {name: {col: mean_std([r[col] for r in runs if col in r]) for col in columns
                    if any(col in r for r in runs)} for name, runs in rows.items()}
    write_tables(table, columns, out)
    results = Results(loaded, raw, table, {name: [options.run_dir(name, s) for s in range(seeds)] for name in raw})
    pngs = study.plots(results)
    if report is not None:
        write_report(report, command, configs, seeds, out, study.sections(results), pngs, study.setup(results))
    return {"sweep": str(out), "configs": stems, "seeds": seeds,
            "table": {n: {c: list(v) for c, v in cols.items()} for n, cols in table.items()}}


def write_tables(table: dict, columns: list[str], out: Path) -> None:
    used = [c for c in columns if any(c in cols for cols in table.values())]
    rows = io.StringIO()
    w = csv.writer(rows)
    w.writerow(["config"] + [f"{c} {s}" for c in used for s in ("mean", "std")])
    for name, cols in table.items():
        w.writerow([name] + [f"{x:.6g}" if c in cols else "" for c in used for x in cols.get(c, (0, 0))])
    lines = ["| config | " + " | ".join(used) + " |", "|---" * (len(used) + 1) + "|"]
    for name, cols in table.items():
        cells = [f"{cols[c][0]:.4g} ± {cols[c][1]:.2g}" if c in cols else "" for c in used]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    write_owned({out / "results.csv": rows.getvalue().encode("utf-8"),
                 out / "results.md": ("\n".join(lines) + "\n").encode("utf-8")}, "--out")


SWEEP_DIRS = ("runs", rl_study.STARTS)  # the folders a sweep makes in --out


def claim_out(out: Path) -> None:
    """A sweep writes into --out only what it can prove is its own (`softar.disk`'s manifest): a new or empty
    folder, or one where a sweep wrote everything there is. The last check before the work: it makes the folders."""
    claim(out, None, "--out")
    for name in SWEEP_DIRS:
        make_folder(out, name, "--out")


def check_report(path: Path, out: Path) -> None:
    """--report replaces only a report a sweep wrote and nobody changed since (the manifest of the folder it is
    in), and its assets folder (beside it, named after it) must be new or a sweep's, and not be --out. Checked
    before any run, writing nothing, so a sweep never trains for a report it cannot write."""
    assets = path.parent / path.stem
    if assets.resolve() == out.resolve():
        raise SoftarError(f"--report {path}: its assets folder {assets} would be --out itself; choose another name")
    claim(path.parent, (path.name, assets.name), f"--report {path}")
    claim(assets, None, f"--report {path}")


def write_report(path: Path, command: str, configs: list[str], seeds: int, out: Path, sections: list[str],
                 pngs: list[str], setup: str) -> None:
    """A Markdown report: the command that regenerates it, the study's setup, the plots (copied beside it), then
    the study's own sections."""
    assets = make_folder(path.parent, path.stem, f"--report {path}")
    write_owned({assets / name: (out / name).read_bytes() for name in (*pngs, "results.csv")}, f"--report {path}")
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
    ]
    write_owned({path: ("\n".join(text) + "\n").encode("utf-8")}, f"--report {path}")
