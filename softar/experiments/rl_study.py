"""The RL study (docs/rl.md): GRPO runs from a supervised task run, one per thought policy it was trained with (hard,
soft, noisy-soft) and seed, scored on the test split by pass@1 and pass@N under hard and under soft inference,
against the supervised run each one started from, paired by seed and question. For a multiple-choice task it also
gives the option-guessing null: the pass@k of the same samples if every answer that names an option named one at
random."""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np

from softar import SoftarError
from softar.checkpoint import latest_checkpoint
from softar.config import Config, load_raw, seeded
from softar.disk import make_folder, read_json, read_jsonl, sha256_file, strict_json, write_owned
from softar.evaluate.reasoning import evaluate_task_run
from softar.evaluate.stats import mean_std, paired_bootstrap_2way
from softar.experiments.study import Results, Study, save_figure
from softar.rl.objective import PASS_K, pass_at_k
from softar.rl.trainer import RLTrainer
from softar.rundir import CHECKPOINTS, METRICS_FILE, read_config

INFERENCE = ("hard", "soft")  # how the thought slots are filled at test time, whatever RL trained
STARTS = "starts"  # in the sweep's folder: the supervised starts' scores, one file per initial run
SETUP = ("Each RL run starts from the supervised run of the same seed (`rl.init_from`, its latest checkpoint; the "
         "header of each RL config names the sweep that makes those runs, which must exist first), and "
         "every figure is on the test split, once, after training: nothing is chosen on valid or on test. pass@k: "
         "the unbiased estimator from the samples of each question, averaged over questions. Δ: paired by seed and "
         "question, with a bootstrap 95% interval that resamples both. Every metric of every config, mean and "
         "standard deviation over seeds: [results.csv]({assets}/results.csv).")

FLOOR_PASS = 0.05  # a start that solves less than this (pass@1) is below the floor: RL has nothing to sharpen


def start_name(task: str) -> str:
    """The results table's row for a task's supervised start (a space: no config file is named so)."""
    return f"start: {task}"


def columns() -> list[str]:
    cols = ["accuracy"]
    for p in INFERENCE:
        cols += [f"sampled.{p}.reward"] + [f"sampled.{p}.pass@{k}" for k in PASS_K]
        cols += [f"sampled.{p}.option_guess.pass@{k}" for k in PASS_K]
    return cols


def test_file(cfg: Config) -> Path:
    return Path(cfg.data.dir) / "test.json"


SHARED = ("rl.init_from", "data.dir", "rl.eval_samples", "task.max_answer_tokens", "rl.reward", "rl.chain",
          "task.depths")  # what the configs of one task share: their start is scored once, as they are


def check_grid(cfgs: dict[str, Config]) -> None:
    """Before any run: the configs of one task score against one start, so they must share what the start is scored
    with. A gated run is scored under hard and soft inference like the others (its gate unused there)."""
    by_task: dict[str, tuple] = {}
    for name, cfg in cfgs.items():
        shared = tuple(str(getattr(getattr(cfg, k.split(".")[0]), k.split(".")[1])) for k in SHARED)
        first = by_task.setdefault(cfg.task.name, shared)
        if shared != first:
            raise SoftarError(f"sweep: the {cfg.task.name} configs must share {', '.join(SHARED)} (they are scored "
                              f"against one start); {name} differs")


def sampled_results(run_dir: Path, cfg: Config) -> dict:
    """pass@k of a run on the test split (its questions at task.depths, where set) under each inference policy:
    cfg.rl.eval_samples samples at temperature 1, answers of at most cfg.task.max_answer_tokens tokens, a pass
    earning rl.reward in full, the policy acting where rl.chain says: {policy: `sampled_eval`'s result}."""
    from softar.rl.trainer import sampled_eval

    return {p: sampled_eval(run_dir, test_file(cfg), p, cfg.rl.eval_samples, 1.0, cfg.train.device, 0,
                            cfg.task.max_answer_tokens, cfg.rl.sigma, cfg.rl.reward, cfg.rl.chain,
                            cfg.task.depths or None) for p in INFERENCE}


def scored_as_now(result: dict) -> bool:
    """Whether a run's kept test scores hold what this version of the study reads (an older softar's lack the
    answer limit they were scored with, and the options count of the guessing null)."""
    sampled = result.get("sampled")
    return isinstance(sampled, dict) and all(
        isinstance(sampled.get(p), dict) and "chain" in sampled[p] and ("named" not in sampled[p]
                                                                             or "options" in sampled[p])
        for p in INFERENCE)


def start_results(inits: list[Path], cfg: Config, out: Path) -> list[dict]:
    """The supervised starts (one per seed) scored exactly as the RL runs of `cfg` are. Each is kept in
    OUT/starts/<run>.json with what it was scored on (the run, its latest checkpoint's weights, the test file, the
    sample count and answer limit), and reused only while all of that is unchanged."""
    starts = []
    for init in inits:
        ckpt = latest_checkpoint(init / CHECKPOINTS)
        if ckpt is None:
            raise SoftarError(f"rl.init_from: {init} has no checkpoint")
        key = {"run": str(init.resolve()), "weights_sha256": sha256_file(ckpt / "model.safetensors"),
               "data_sha256": sha256_file(test_file(cfg)), "samples": cfg.rl.eval_samples,
               "max_answer": cfg.task.max_answer_tokens, "sigma": cfg.rl.sigma, "reward": cfg.rl.reward,
               "chain": cfg.rl.chain, "depths": cfg.task.depths}
        path = make_folder(out, STARTS, "--out") / f"{init.name}.json"
        kept = read_json(path, "start scores", {"key": dict, "sampled": dict}) if path.is_file() else None
        if kept is None or kept["key"] != key or not scored_as_now(kept):
            kept = {"key": key, "sampled": sampled_results(init, cfg)}
            write_owned({path: strict_json(kept, indent=2).encode("utf-8")}, "--out")
        starts.append({"run_dir": str(init), "sampled": kept["sampled"]})
    return starts


def per_question(sampled: dict, k: int) -> np.ndarray:
    """pass@k of each question from its count of passing samples."""
    return np.array([pass_at_k(sampled["samples"], r, k) for r in sampled["right"]])


def delta(a: list[dict], b: list[dict], policy: str, k: int, level: float = 0.95) -> dict:
    """a's pass@k minus b's under one inference policy, paired by seed (list position) and question."""
    return paired_bootstrap_2way(np.stack([per_question(r["sampled"][policy], k) for r in a]),
                                 np.stack([per_question(r["sampled"][policy], k) for r in b]), level=level)


def over_guessing(runs: list[dict], policy: str, k: int, level: float = 0.95) -> dict:
    """pass@k minus the option-guessing null of the same samples, paired by seed and question."""
    from softar.rl.trainer import option_guess

    return paired_bootstrap_2way(np.stack([per_question(r["sampled"][policy], k) for r in runs]),
                                 np.stack([option_guess(r["sampled"][policy], k, per_question=True) for r in runs]),
                                 level=level)


def _mean_std_cell(values: list[float]) -> str:
    m, s = mean_std(values)
    return f"{m:.3f} ± {s:.3f}"


def _delta_cell(d: dict) -> str:
    return f"{d['diff']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]"


def report_sections(raw: dict[str, list[dict]], cfgs: dict[str, Config], starts: dict[str, list[dict]]) -> list[str]:
    """A section per task: what was run, the grid (training policy x inference policy) against the start, the soft
    policies against hard-thought RL, and what it answers."""
    out = []
    for task in dict.fromkeys(c.task.name for c in cfgs.values()):
        names = [n for n, c in cfgs.items() if c.task.name == task]
        start = starts[task]
        first = start[0]["sampled"]["hard"]
        # the option-guessing null is what a right answer alone could be; a path reward's pass is not a guess
        options = "option_guess" in first and cfgs[names[0]].rl.reward == "answer"
        formed = "well_formed" in first
        top = max(k for k in PASS_K if k <= first["samples"])  # pass@1 and pass@N
        r, t = cfgs[names[0]].rl, cfgs[names[0]].train
        out += [f"## {task}", "",
                f"{len(first['right'])} test questions, {len(start)} seeds, {first['samples']} samples per question "
                f"at temperature 1 (answers of at most {first['max_answer']} tokens); mean ± std over seeds. Each RL "
                f"run: {t.max_iters} steps of {t.batch_size} prompts x {r.group_size} rollouts, {r.inner_steps} "
                f"clipped updates per batch (clip {r.clip}), learning rate {t.lr:g} (warmup {t.warmup_iters}, cosine "
                f"to {t.min_lr:g}), KL weight {r.kl_coef:g} to the initial policy, noise σ {r.sigma:g} (noisy-soft). "
                f"The starts: {', '.join('`' + x['run_dir'] + '`' for x in start)}." +
                (" Guessing null: the pass@k of the same samples if each answer that names one of the "
                 f"{first['options']} options named one at random; pass@k above it is more than guessing."
                 if options else "") + _scoring(cfgs[names[0]], formed), "",
                f"| trained | policy | inference | pass@1 | Δ pass@1 vs start [95% CI] | pass@{top} | Δ pass@{top} vs "
                "start [95% CI] |" + (f" guessing null pass@1 | guessing null pass@{top} |" if options else "")
                + (" well-formed, wrong |" if formed else ""),
                "|---" * (7 + 2 * options + formed) + "|"]
        for name, runs in [("start", start), *((n, raw[n]) for n in names)]:
            for p in INFERENCE:
                s = [run["sampled"][p] for run in runs]
                is_start = name == "start"
                cells = [name if is_start else f"`{name}`", "supervised" if is_start else cfgs[name].rl.policy, p,
                         _mean_std_cell([x["pass@1"] for x in s]),
                         "-" if is_start else _delta_cell(delta(runs, start, p, 1)),
                         _mean_std_cell([x[f"pass@{top}"] for x in s]),
                         "-" if is_start else _delta_cell(delta(runs, start, p, top))]
                if options:
                    cells += [_mean_std_cell([x["option_guess"][f"pass@{k}"] for x in s]) for k in (1, top)]
                if formed:  # the format-only null: samples well formed and not passing
                    cells.append(_mean_std_cell([x["well_formed"] - x["pass@1"] for x in s]))
                out.append("| " + " | ".join(cells) + " |")
        hard = next((n for n in names if cfgs[n].rl.policy == "hard"), None)
        others = [n for n in names if n != hard]
        if hard and others:
            out += ["", f"Against RL on hard thoughts (`{hard}`), paired by seed and question:", "",
                    f"| trained | inference | Δ pass@1 [95% CI] | Δ pass@{top} [95% CI] |", "|---" * 4 + "|"]
            for n in others:
                for p in INFERENCE:
                    out.append(f"| `{n}` | {p} | {_delta_cell(delta(raw[n], raw[hard], p, 1))} | "
                               f"{_delta_cell(delta(raw[n], raw[hard], p, top))} |")
        out += ["", *findings(names, raw, start, hard, (1, top), options), ""]
    return out


def _scoring(cfg: Config, formed: bool) -> str:
    """How a sample passes, for a section's header."""
    depths = f" The questions: those of depth {', '.join(map(str, cfg.task.depths))}." if cfg.task.depths else ""
    chain = (" The chain is filled by the policy, one thought slot per step (`rl.chain = \"thoughts\"`); a soft "
             "step reads as its LM head's most likely token." if cfg.rl.chain == "thoughts" else "")
    fmt = (" *Well-formed, wrong*: the share of samples whose output is well formed (every step a node, one node as "
           "the answer) but does not pass, the format-only null that a learned format must not be taken for."
           if formed else "")
    return f" A sample passes when it earns the `{cfg.rl.reward}` reward in full.{depths}{chain}{fmt}"


def findings(names: list[str], raw: dict, start: list[dict], hard: str | None, ks: tuple[int, int],
             options: bool) -> list[str]:
    """What the grid says, read off its tables. Each family of comparisons is tested at a Bonferroni-corrected level
    (95% over the family), so picking the best of several cells does not manufacture a win. The soft policies are
    compared with hard RL only where the positive control holds: hard RL above its start at pass@1 under hard
    inference."""
    lines = []
    floor = any(over_guessing(start, p, 1)["lo"] > 0.01 for p in INFERENCE) if options else max(
        statistics.fmean(r["sampled"][p]["pass@1"] for r in start) for p in INFERENCE) >= FLOOR_PASS
    if not floor:
        lines.append("- **Below the floor at this budget**: the supervised start " + (
            "is not above the option-guessing null" if options else f"solves under {FLOOR_PASS} of the questions")
            + ", so RL starts with nothing to sharpen; no comparison below says what RL can or cannot do.")
    cells = [(n, p) for n in names for p in INFERENCE]
    level = 1 - 0.05 / len(cells)
    gains = {(n, p): delta(raw[n], start, p, 1, level) for n, p in cells}
    every_seed = {(n, p): all(a["sampled"][p]["pass@1"] > b["sampled"][p]["pass@1"] for a, b in zip(raw[n], start,
                                                                                                      strict=True))
                  for n, p in cells}
    up = [f"`{n}` with {p} inference ({_delta_cell(d)}, corrected)" for (n, p), d in gains.items()
          if d["lo"] > 0 and every_seed[(n, p)]]
    (best, bp), d = max(gains.items(), key=lambda kv: kv[1]["diff"])
    lines.append("- Test pass@1 above the supervised start, in every seed and with a corrected interval above 0: "
                 + (", ".join(up) if up else f"none; the largest gain is `{best}` with {bp} inference, "
                    f"{_delta_cell(d)} (corrected).") + ("." if up else ""))
    control = delta(raw[hard], start, "hard", 1) if hard else None
    if control is not None:
        holds = control["lo"] > 0
        lines.append(f"- **Positive control** (hard RL, `{hard}`, raises pass@1 under hard inference; uncorrected, it "
                     f"is one pre-stated test): {_delta_cell(control)}, "
                     + ("holds." if holds else "does not hold, so the comparisons with hard RL below say nothing "
                        "about soft thoughts."))
    for k in ks:
        if not hard:
            break
        pairs = [(n, p) for n in names if n != hard for p in INFERENCE]
        vs = {(n, p): delta(raw[n], raw[hard], p, k, 1 - 0.05 / len(pairs)) for n, p in pairs}
        above = [f"`{n}` ({p} inference, {_delta_cell(x)})" for (n, p), x in vs.items() if x["lo"] > 0]
        below = [f"`{n}` ({p} inference, {_delta_cell(x)})" for (n, p), x in vs.items() if x["hi"] < 0]
        lines.append(f"- pass@{k}, RL on soft or noisy-soft thoughts against RL on hard thoughts (corrected "
                     "intervals): " + (f"above it: {', '.join(above)}" if above else "none is resolved above it")
                     + (f"; below it: {', '.join(below)}" if below else "") + ".")
    if options:
        for k in ks:
            runs = [("start", start)] + [(n, raw[n]) for n in names]
            level = 1 - 0.05 / (len(runs) * len(INFERENCE))
            over = {(n, p): over_guessing(rs, p, k, level) for n, rs in runs for p in INFERENCE}
            beat = [f"`{n}` ({p}, {_delta_cell(d)})" for (n, p), d in over.items() if d["lo"] > 0.01]
            lines.append(f"- pass@{k} more than 0.01 above the guessing null of the same samples (corrected "
                         "intervals): " + (", ".join(beat) if beat else "none") + ".")
    return lines


def plot_curves(run_dirs: dict[str, list[Path]], cfgs: dict[str, Config], out: Path, window: int = 10) -> None:
    """reward_curves.png: per task, the training reward, the KL to the start and the entropy of each group's
    outputs (moving averages over `window` logged steps), and the valid pass@1 at each evaluation, mean over seeds,
    one line per config."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(c.task.name for c in cfgs.values()))
    rows_of = (("train", "reward", "training reward"), ("eval", "val_pass@1", "valid pass@1 at evaluations"),
               ("train", "kl", "KL to the start"), ("train", "answer_entropy", "output entropy per group (nats)"))
    fig, axes = plt.subplots(len(rows_of), len(tasks), figsize=(5.5 * len(tasks), 3.2 * len(rows_of)),
                             squeeze=False)
    for col, task in enumerate(tasks):
        for name in (n for n, c in cfgs.items() if c.task.name == task):
            rows = [read_jsonl(d / METRICS_FILE, "metrics")[0] for d in run_dirs[name]]
            for row, (kind, key, _) in enumerate(rows_of):
                curves = [{r["step"]: r[key] for r in rs if r.get("kind") == kind and isinstance(r.get(key), float)}
                          for rs in rows]
                steps = sorted(set.intersection(*(set(c) for c in curves)))
                ys = [statistics.fmean(c[s] for c in curves) for s in steps]
                if kind == "train" and len(ys) >= window:
                    ys = list(np.convolve(ys, np.ones(window) / window, mode="valid"))
                    steps = steps[window - 1:]
                axes[row][col].plot(steps, ys, label=name, marker="o" if kind == "eval" else None)
        for row, (kind, key, title) in enumerate(rows_of):
            mean = f" ({window}-step mean)" if kind == "train" else ""
            axes[row][col].set(title=f"{task}: {title}{mean}", xlabel="step", ylabel=key)
        axes[0][col].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, out / "reward_curves.png")


class RLStudy(Study):
    """RL configs (an [rl] table naming init_from): each scored on the test split by pass@k under hard and soft
    inference, against the supervised start each one began from."""

    name = "RL"
    trainer = RLTrainer

    def check(self) -> None:
        check_grid(self.configs)
        o = self.options
        templates = {name: load_raw(o.paths[name], list(o.overrides))["rl"]["init_from"] for name in self.configs}
        self.inits = {name: [Path(seeded(templates[name], o.base_seed + s)) for s in range(o.seeds)]
                      for name in self.configs}
        for d in {d for dirs in self.inits.values() for d in dirs}:  # every seed's start exists before a run trains
            read_config(d)

    def evaluate(self, run_dir: Path, cfg: Config, seed: int) -> dict:
        result = evaluate_task_run(run_dir, cfg.task.name, test_file(cfg), cfg.train.device)
        result["sampled"] = sampled_results(run_dir, cfg)  # and pass@k under each inference policy
        return result

    def stale(self, kept: dict, seed: int) -> bool:
        return not scored_as_now(kept)

    def extra_rows(self) -> dict[str, list[dict]]:
        self.starts: dict[str, list[dict]] = {}
        for name, cfg in self.configs.items():  # one start per task (`check_grid`): its configs share their starts
            if cfg.task.name not in self.starts:
                self.starts[cfg.task.name] = start_results(self.inits[name], cfg, self.options.out)
        return {start_name(task): runs for task, runs in self.starts.items()}

    def columns(self) -> list[str]:
        return columns()

    def bar_metrics(self) -> list[str]:
        return []

    def plots(self, results: Results) -> list[str]:
        plot_curves(results.dirs, results.configs, self.options.out)
        return ["reward_curves.png"]

    def setup(self, results: Results) -> str:
        return SETUP

    def sections(self, results: Results) -> list[str]:
        return report_sections(results.raw, results.configs, self.starts)
