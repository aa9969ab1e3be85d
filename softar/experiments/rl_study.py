"""The RL study (docs/rl.md): GRPO runs from a supervised task run, one per thought policy it was trained with (hard,
soft, noisy-soft) and seed, scored on the test split by pass@1 and pass@32 under hard and under soft inference,
against the supervised run each one started from, paired by seed and question. For a two-option task it also gives
the option-guessing null: the pass@k of the same samples if every answer that names an option named one at random."""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np

from softar.config import Config
from softar.disk import read_json, read_jsonl, strict_json, write_text_atomic
from softar.evaluate.stats import mean_std, paired_bootstrap_2way
from softar.rl.objective import PASS_K, guessed_pass_at_k, pass_at_k
from softar.rundir import METRICS_FILE, RESULT_FILE, read_config

INFERENCE = ("hard", "soft")  # how the thought slots are filled at test time, whatever RL trained
START = "start"  # the table's name for the supervised starting point
SETUP = ("Each RL run starts from the supervised run of the same seed (`rl.init_from`, its latest checkpoint), and "
         "every figure is on the test split, once, after training: nothing is chosen on valid or on test. pass@k: "
         "the unbiased estimator from the samples of each question, averaged over questions. Δ: paired by seed and "
         "question, with a bootstrap 95% interval that resamples both. Every metric of every config, mean and "
         "standard deviation over seeds: [results.csv]({assets}/results.csv).")


def columns() -> list[str]:
    cols = ["accuracy"]
    for p in INFERENCE:
        cols += [f"sampled.{p}.{k}" for k in ("reward", "pass@1", "pass@4", "pass@16", "pass@32")]
        cols += [f"sampled.{p}.option_guess.pass@{k}" for k in PASS_K]
    return cols


def test_file(cfg: Config) -> Path:
    return Path(cfg.data.dir) / "test.json"


def sampled_results(run_dir: Path, cfg: Config) -> dict:
    """pass@k of a run on the test split under each inference policy, with cfg.rl.eval_samples samples at
    temperature 1: {policy: softar eval's "sampled"}."""
    from softar.rl.trainer import sampled_eval

    return {p: sampled_eval(run_dir, test_file(cfg), p, cfg.rl.eval_samples, 1.0, cfg.train.device)
            for p in INFERENCE}


def start_results(run_dirs: list[Path], cfg: Config) -> list[dict]:
    """The supervised starting point of each RL run (one per seed), scored as the RL runs are. Each score is kept in
    the initial run's folder under the name `softar eval --task ... --samples N --policy P` gives it, and reused
    while the run's final step is the one it was scored at."""
    from softar.rl.trainer import task_eval

    starts = []
    for run_dir in run_dirs:
        init = Path(read_config(run_dir).rl.init_from)
        step = read_json(init / RESULT_FILE, "result", {"step": int})["step"]
        sampled = {}
        for p in INFERENCE:
            kept = _cached(init, cfg, p, step)
            if kept is None:
                kept, name = task_eval(init, cfg.task.name, test_file(cfg), cfg.train.device, 0,
                                       cfg.rl.eval_samples, p, 1.0)
                write_text_atomic(init / name, strict_json(kept, indent=2))
            sampled[p] = kept["sampled"]
        starts.append({"run_dir": str(init), "sampled": sampled})
    return starts


def _cached(init: Path, cfg: Config, policy: str, step: int) -> dict | None:
    from softar.rl.trainer import task_eval_name

    path = init / task_eval_name(cfg.task.name, test_file(cfg), 0, cfg.rl.eval_samples, policy, 1.0)
    if not path.is_file():
        return None
    kept = read_json(path, "evaluation", {"step": int, "sampled": dict})
    return kept if kept["step"] == step and "right" in kept["sampled"] else None


def per_question(sampled: dict, k: int) -> np.ndarray:
    """pass@k of each question from its count of passing samples."""
    return np.array([pass_at_k(sampled["samples"], r, k) for r in sampled["right"]])


def delta(a: list[dict], b: list[dict], policy: str, k: int) -> dict:
    """a's pass@k minus b's under one inference policy, paired by seed (list position) and question."""
    return paired_bootstrap_2way(np.stack([per_question(r["sampled"][policy], k) for r in a]),
                                 np.stack([per_question(r["sampled"][policy], k) for r in b]))


def _ms(values: list[float]) -> str:
    m, s = mean_std(values)
    return f"{m:.3f} ± {s:.3f}"


def _d(d: dict) -> str:
    return f"{d['diff']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]"


def report_sections(raw: dict[str, list[dict]], cfgs: dict[str, Config], starts: dict[str, list[dict]]) -> list[str]:
    """A section per task: the grid (training policy x inference policy) against the start, the soft policies
    against hard-thought RL, and what it answers."""
    out = []
    first = next(iter(cfgs.values()))
    r, t = first.rl, first.train
    out += ["## What was run", "",
            f"Each RL run: {t.max_iters} steps of {t.batch_size} prompts x {r.group_size} rollouts, {r.inner_steps} "
            f"clipped updates per batch (clip {r.clip}), learning rate {t.lr:g} (warmup {t.warmup_iters}, cosine to "
            f"{t.min_lr:g}), KL weight {r.kl_coef:g} to the initial policy, noise σ {r.sigma:g} (noisy-soft), sampling "
            f"temperature {r.temperature:g}. Test: {r.eval_samples} samples per question at temperature 1. The "
            "policy a run was trained with is its name's last part.", ""]
    for task in dict.fromkeys(c.task.name for c in cfgs.values()):
        names = [n for n, c in cfgs.items() if c.task.name == task]
        start = starts[task]
        options = "option_guess" in start[0]["sampled"]["hard"]
        questions = len(start[0]["sampled"]["hard"]["right"])
        ks = (1, max(k for k in PASS_K if k <= start[0]["sampled"]["hard"]["samples"]))  # pass@1 and pass@N
        top = ks[1]
        out += [f"## {task}", "",
                f"{questions} test questions, {len(start)} seeds; mean ± std over seeds." +
                (" Guessing null: the pass@k of the same samples if each answer that names one of the two options "
                 "named one at random; pass@k above it is more than guessing." if options else ""), "",
                f"| trained | inference | pass@1 | Δ pass@1 vs start [95% CI] | pass@{top} | Δ pass@{top} vs start "
                "[95% CI] |" + (f" guessing null pass@1 | guessing null pass@{top} |" if options else ""),
                "|---" * (8 if options else 6) + "|"]
        for name, runs in [(START, start), *((n, raw[n]) for n in names)]:
            for p in INFERENCE:
                s = [run["sampled"][p] for run in runs]
                cells = [name if name == START else f"`{name}`", p, _ms([x["pass@1"] for x in s]),
                         "-" if name == START else _d(delta(runs, start, p, 1)), _ms([x[f"pass@{top}"] for x in s]),
                         "-" if name == START else _d(delta(runs, start, p, top))]
                if options:
                    cells += [_ms([x["option_guess"][f"pass@{k}"] for x in s]) for k in ks]
                out.append("| " + " | ".join(cells) + " |")
        hard = next((n for n in names if cfgs[n].rl.policy == "hard"), None)
        others = [n for n in names if n != hard]
        if hard and others:
            out += ["", f"Against RL on hard thoughts (`{hard}`), paired by seed and question:", "",
                    f"| trained | inference | Δ pass@1 [95% CI] | Δ pass@{top} [95% CI] |", "|---" * 4 + "|"]
            for n in others:
                for p in INFERENCE:
                    out.append(f"| `{n}` | {p} | {_d(delta(raw[n], raw[hard], p, 1))} | "
                               f"{_d(delta(raw[n], raw[hard], p, top))} |")
        out += ["", *_findings(names, raw, start, hard, ks), ""]
    return out


def _findings(names: list[str], raw: dict, start: list[dict], hard: str | None, ks: tuple[int, int]) -> list[str]:
    """What the grid says, each sentence read off the tables above."""
    lines = []
    gains = {(n, p): delta(raw[n], start, p, 1) for n in names for p in INFERENCE}
    (best, bp), d = max(gains.items(), key=lambda kv: kv[1]["diff"])
    spread = max(mean_std([s["sampled"][p]["pass@1"] for s in start])[1] for p in INFERENCE)
    raised = d["lo"] > 0 and d["diff"] > spread
    lines.append(f"- RL {'raises' if raised else 'does not raise'} test pass@1 above the supervised start beyond "
                 f"the seed spread: the largest gain is `{best}` with {bp} inference, {_d(d)} (the start's spread "
                 f"over seeds: ±{spread:.3f}).")
    for k in ks:
        if not hard:
            break
        wins = [(n, p, delta(raw[n], raw[hard], p, k)) for n in names if n != hard for p in INFERENCE]
        above = [f"`{n}` ({p} inference, {_d(x)})" for n, p, x in wins if x["lo"] > 0]
        below = [f"`{n}` ({p} inference, {_d(x)})" for n, p, x in wins if x["hi"] < 0]
        lines.append(f"- pass@{k}, soft-thought RL against hard-thought RL: "
                     + (f"above it: {', '.join(above)}" if above else "none is resolved above it")
                     + (f"; below it: {', '.join(below)}" if below else "") + ".")
    if "option_guess" in start[0]["sampled"]["hard"]:
        for k in ks:
            over = [f"`{n}` ({p})" for n in [START, *names] for p in INFERENCE
                    if _beats_guessing(start if n == START else raw[n], p, k)]
            lines.append(f"- pass@{k} above the guessing null of the same samples (interval excluding 0): "
                         + (", ".join(over) if over else "none") + ".")
    return lines


def _beats_guessing(runs: list[dict], policy: str, k: int) -> bool:
    """Whether pass@k beats the option-guessing null of the same samples, paired by seed and question."""
    real = np.stack([per_question(r["sampled"][policy], k) for r in runs])
    null = np.stack([[guessed_pass_at_k(r["sampled"][policy]["samples"], m, k) for m in r["sampled"][policy]["named"]]
                     for r in runs])
    return paired_bootstrap_2way(real, null)["lo"] > 0


def plot_curves(raw_dirs: dict[str, list[Path]], cfgs: dict[str, Config], out: Path, window: int = 10) -> None:
    """reward_curves.png: per task, the training reward (a moving average over `window` steps) and the valid pass@1
    at each evaluation, mean over seeds, one line per config."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(c.task.name for c in cfgs.values()))
    fig, axes = plt.subplots(2, len(tasks), figsize=(5.5 * len(tasks), 6.5), squeeze=False)
    for col, task in enumerate(tasks):
        for name in (n for n, c in cfgs.items() if c.task.name == task):
            rows = [read_jsonl(d / METRICS_FILE, "metrics")[0] for d in raw_dirs[name]]
            for row, (kind, key) in enumerate((("train", "reward"), ("eval", "val_pass@1"))):
                curves = [{r["step"]: r[key] for r in rs if r.get("kind") == kind and isinstance(r.get(key), float)}
                          for rs in rows]
                steps = sorted(set.intersection(*(set(c) for c in curves)))
                ys = [statistics.fmean(c[s] for c in curves) for s in steps]
                if kind == "train" and len(ys) >= window:
                    ys = list(np.convolve(ys, np.ones(window) / window, mode="valid"))
                    steps = steps[window - 1:]
                axes[row][col].plot(steps, ys, label=name, marker="o" if kind == "eval" else None)
        axes[0][col].set(title=f"{task}: training reward ({window}-step mean)", xlabel="step", ylabel="reward")
        axes[1][col].set(title=f"{task}: valid pass@1 at evaluations", xlabel="step", ylabel="pass@1")
        axes[0][col].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "reward_curves.png", dpi=120)
    plt.close(fig)
