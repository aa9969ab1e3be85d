"""The reasoning study (docs/reasoning.md): each training mode's greedy test accuracy on a task against chain of
thought, paired over seeds and test questions with a two-way bootstrap interval; thought, pause and step tokens, time
per question, accuracy by number of reasoning steps and by curriculum stage, thought norms, and the superposition
probe (frontier nodes a thought holds against chance)."""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np

from softar.config import Config
from softar.disk import read_jsonl
from softar.evaluate.reasoning import evaluate_task_run
from softar.evaluate.stats import paired_bootstrap_2way
from softar.experiments.study import Results, Study, save_figure
from softar.tasks.data import recall_at, stage_iters
from softar.tasks.modes import MODES

STAGES, DEPTHS, STEPS = range(7), range(1, 7), range(1, 7)
# the gate every compared model must pass, and the pre-registered comparison (docs/reasoning.md states them before
# any run): a model counts only if it answers >= GATE of the depth-1 questions; Coconut minus CoT at the deepest depth
GATE, GATE_DEPTH, EQUIVALENCE, PREREGISTERED_SEEDS = 0.95, 1, 0.02, 5
BAR_METRICS = ["accuracy", "step_tokens", "seconds_per_question"]
SETUP = ("Every config trains the same model for the same number of steps and batch on the same question "
         "distribution (its header and docs/reasoning's table say what differs: the mode; a curriculum mode also "
         "draws one depth per batch and replaces steps in stages). Loss curves: the sampled valid loss; "
         "everything else on the test split, once, after training. Every metric of every config, mean and standard "
         "deviation over seeds: [results.csv]({assets}/results.csv).")
REFERENCE_MODE = "cot"
# the anchors the issue quotes: what they trained, for the budget comparison the report states
ANCHORS = ("Coconut (Hao et al. 2024) reached 97.0% with continuous thoughts against 77.5% for CoT on ProsQA with "
           "GPT-2 (124M parameters, pretrained), fine-tuned for 50 epochs on 17,886 questions in the text "
           "rendering on GPUs.")


def plot_accuracy(names: list[str], seeds: int, base_seed: int, out: Path, cfgs: dict[str, Config]) -> None:
    """accuracy_curves.png: the periodic evals' valid accuracy (at the stage being trained) over steps, mean over
    seeds, with the curriculum's stage boundaries."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name in names:
        curves = []
        for s in range(seeds):
            rows = read_jsonl(out / "runs" / f"{name}_s{base_seed + s}" / "metrics.jsonl", "metrics")[0]
            curves.append({r["step"]: r["val_accuracy"] for r in rows if r.get("kind") == "eval"
                           and isinstance(r.get("val_accuracy"), int | float)})
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        ax.plot(steps, [statistics.fmean(c[s] for c in curves) for s in steps], marker="o", label=name)
    staged = [cfgs[n] for n in names if MODES[cfgs[n].task.mode].curriculum]
    if staged:
        per = stage_iters(staged[0].task, staged[0].train.max_iters)
        for k in range(1, staged[0].task.max_stage + 1):
            ax.axvline(k * per, color="grey", lw=0.5, ls=":")
    ax.set(xlabel="step", ylabel="valid accuracy (first task.eval_examples, greedy)",
           title="Accuracy during training (dotted: curriculum stages)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, out / "accuracy_curves.png")


def columns() -> list[str]:
    cols = ["accuracy", "option_rate", "accuracy_when_option", "loss", "thought_tokens", "pause_tokens",
            "step_tokens", "seconds_per_question", "thought_norm", "embedding_norm"]
    cols += [f"accuracy_by_steps.{k}" for k in STEPS] + [f"stage_{k}.accuracy" for k in STAGES]
    return cols + [f"probe.{d}.{m}" for d in DEPTHS for m in ("frontier", "held", "chance")]


def _ms(table: dict, name: str, col: str, scale: float = 1.0, digits: int = 3) -> str:
    if col not in table[name]:
        return "-"
    m, s = table[name][col]
    return f"{m * scale:.{digits}g} ± {s * scale:.2g}"


def _label(cfg: Config) -> str:
    return MODES[cfg.task.mode].label(cfg)


def against(raw: dict[str, list[dict]], name: str, ref: str) -> dict | None:
    """name's accuracy minus ref's, paired by seed and test question: mean and a two-way bootstrap 95% interval."""
    a = [r.get("correct") for r in raw[name]]
    b = [r.get("correct") for r in raw[ref]]
    if any(x is None for x in a + b) or len({len(x) for x in a + b}) != 1 or len(a) != len(b):
        return None
    return paired_bootstrap_2way(np.array(a), np.array(b))


def beyond_chance(runs: list[dict], n_boot: int = 2000, seed: int = 0) -> dict | None:
    """Accuracy among the answers that name one of the two options (0.5 by chance), pooled over seeds, with a
    bootstrap 95% interval resampling seeds and, shared across them, questions; None without option data."""
    named = [r.get("named_option") for r in runs]
    if any(x is None for x in named) or len({len(x) for x in named}) != 1:
        return None
    named, correct = np.array(named), np.array([r["correct"] for r in runs])
    if named.sum() == 0:
        return None
    rng = np.random.default_rng(seed)
    S, Q = named.shape
    stats = []
    for _ in range(n_boot):
        s, q = rng.integers(0, S, S), rng.integers(0, Q, Q)
        hits = named[s][:, q].sum()
        if hits:
            stats.append(correct[s][:, q].sum() / hits)
    lo, hi = np.percentile(stats, [2.5, 97.5])
    return {"mean": float(correct.sum() / named.sum()), "lo": float(lo), "hi": float(hi),
            "option_rate": float(named.mean())}


def report_sections(table: dict, raw: dict[str, list[dict]], cfgs: dict[str, Config]) -> list[str]:
    names = list(table)
    ref = next((n for n in names if cfgs[n].task.mode == REFERENCE_MODE), None)
    first = cfgs[names[0]]
    seeds = len(raw[names[0]])
    examples = raw[names[0]][0].get("examples", 0)
    out = ["## Accuracy", "",
           f"Greedy exact-match accuracy on the test split ({examples} questions), mean ± std over {seeds} seeds, "
           "each run's final checkpoint (none is chosen, on valid or on test). Δ: the difference from CoT paired by "
           "seed and question, with a bootstrap 95% interval resampling both. Names an option: the fraction of answers "
           "whose final concept is one of the two the question offers; among those, naming one at random is right "
           "half the time, so accuracy when it names one is the figure to hold against 0.5.", "",
           "| config | mode | test accuracy | Δ vs CoT [95% CI] | names an option | accuracy when it names one | "
           "thought slots | pause slots | generated step tokens | ms per question |", "|---" * 10 + "|"]
    deltas = {}
    for n in names:
        d = against(raw, n, ref) if ref and n != ref else None
        deltas[n] = d
        cell = f"{d['diff']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]" if d else "-"
        out.append(f"| {n} | {_label(cfgs[n])} | {_ms(table, n, 'accuracy')} | {cell} | "
                   f"{_ms(table, n, 'option_rate')} | {_ms(table, n, 'accuracy_when_option')} | "
                   f"{_ms(table, n, 'thought_tokens')} | {_ms(table, n, 'pause_tokens')} | "
                   f"{_ms(table, n, 'step_tokens')} | {_ms(table, n, 'seconds_per_question', 1000)} |")
    steps = [k for k in STEPS if any(f"accuracy_by_steps.{k}" in table[n] for n in names)]
    out += ["", "## By number of reasoning steps", "", "| config | " + " | ".join(f"{k} steps" for k in steps) + " |",
            "|---" * (len(steps) + 1) + "|"]
    out += [f"| {n} | " + " | ".join(_ms(table, n, f"accuracy_by_steps.{k}") for k in steps) + " |" for n in names]
    staged = [n for n in names if MODES[cfgs[n].task.mode].curriculum]
    if staged:
        out += ["", "## By curriculum stage", "",
                "The final checkpoint evaluated at every stage k: the first k steps replaced by k * c thoughts "
                "(c = task.thoughts_per_step), the rest generated (stage 0 is CoT with the same weights).", "",
                "| config | " + " | ".join(f"stage {k}" for k in STAGES) + " |", "|---" * (len(STAGES) + 1) + "|"]
        out += [f"| {n} | " + " | ".join(_ms(table, n, f"stage_{k}.accuracy") for k in STAGES) + " |" for n in staged]
        out += ["", "## Thought vectors and the superposition probe", "",
                "Norms: mean L2 norm of the thoughts against the mean norm of the embedding rows. Probe: for thought "
                "j, the graph's nodes ranked by the thought's dot product with their embeddings (the LM head's "
                "reading); of the |F| top-ranked, how many lie in the breadth-first frontier F at depth j; chance is "
                "|F|^2 / n.", "",
                "| config | thought norm | embedding norm | " + " | ".join(
                    f"depth {d}: held / frontier (chance)" for d in DEPTHS[:4]) + " |", "|---" * 7 + "|"]
        for n in staged:
            probe = [f"{_ms(table, n, f'probe.{d}.held', digits=2)} / {_ms(table, n, f'probe.{d}.frontier', digits=2)}"
                     f" ({_ms(table, n, f'probe.{d}.chance', digits=2)})" for d in DEPTHS[:4]]
            out.append(f"| {n} | {_ms(table, n, 'thought_norm')} | {_ms(table, n, 'embedding_norm')} | "
                       + " | ".join(probe) + " |")
    out += ["", "## What it shows", "",
            "A mode beats CoT only if it wins the paired comparison *and* chooses the reachable option more often "
            "than naming one of the two at random would (accuracy among the answers that name an option, with a "
            "bootstrap 95% interval over seeds and questions, above 0.5): otherwise its edge is format, not "
            "reasoning.", ""]
    reasoning = {n: beyond_chance(raw[n]) for n in names}
    gated = gate_passes(raw)
    floor = {n for n in names if gated is not None and not gated[n]}  # below the gate: nothing concluded from them
    for n in names:
        d, r = deltas[n], reasoning[n]
        parts = []
        if d is not None:
            parts.append(f"{d['diff']:+.3f} accuracy against CoT [{d['lo']:+.3f}, {d['hi']:+.3f}]")
        if r is not None:
            parts.append(f"names an option in {r['option_rate']:.0%} of its answers, and among those is right "
                         f"{r['mean']:.3f} [{r['lo']:.3f}, {r['hi']:.3f}]"
                         + (" (above chance)" if r["lo"] > 0.5 else " (not above the 0.5 of chance)"))
        deepest = max(raw[n][0].get("question_steps") or [0])
        if gated is not None and (x := at_depth(raw[n], deepest)) is not None:  # pooled figures hide the depths
            parts.append(f"at depth {deepest} alone it is right {float(x.mean()):.3f}")
        if n in floor:
            parts.append(f"below the floor (depth-{GATE_DEPTH} accuracy under {GATE} on some seed): nothing is "
                         "concluded from it")
        out.append(f"- **{n}** ({_label(cfgs[n])}): " + "; ".join(parts) + ".")
    winners = [n for n in staged if deltas.get(n) and deltas[n]["lo"] > 0 and reasoning[n]
               and reasoning[n]["lo"] > 0.5 and n not in floor]
    steps = task_steps(first)
    recall = first.train.max_iters - steps
    learned = [n for n in names if reasoning[n] and reasoning[n]["lo"] > 0.5 and n not in floor]
    out += ["", ("Continuous or soft thoughts beat CoT beyond the seed-and-question interval, and above chance among "
                 "answers naming an option: " + ", ".join(winners) + ".") if winners else
            ("Below the floor at this budget: no config picks the reachable option more often than chance, so this "
             "sweep cannot say whether any mode helps." if not learned else
             "No thought mode beats CoT beyond the interval. Configs that pick the reachable option above chance "
             "(and pass the gate, where one applies): " + ", ".join(learned) + "."),
            "", f"Budget here: a {first.model.n_layer}-layer, d_model {first.model.d_model} model trained from "
            f"scratch for {first.train.max_iters} steps of {first.train.batch_size} sequences"
            + (f", {recall} of them associative recall (warm-up and replay) and {steps} questions" if recall else "")
            + f" ({steps * first.train.batch_size:,} questions seen) in the {first.task.render} rendering, on CPU. "
            f"{ANCHORS}"]
    return out


def at_depth(runs: list[dict], depth: int) -> np.ndarray | None:
    """Correctness [seeds, questions with `depth` reasoning steps], every seed on the same questions; None without
    per-question steps or without such questions."""
    steps = runs[0].get("question_steps")
    if steps is None or any(r.get("question_steps") != steps or r.get("correct") is None for r in runs):
        return None
    cols = [i for i, k in enumerate(steps) if k == depth]
    return np.array([r["correct"] for r in runs], dtype=np.float64)[:, cols] if cols else None


def paired_at(raw: dict[str, list[dict]], a: str, b: str, depth: int) -> dict | None:
    """a's accuracy minus b's at one depth, paired by seed and question, with a two-way bootstrap 95% interval."""
    x, y = at_depth(raw[a], depth), at_depth(raw[b], depth)
    return paired_bootstrap_2way(x, y) if x is not None and y is not None and x.shape == y.shape else None


def by_role(cfgs: dict[str, Config]) -> dict[str, str]:
    """The config that plays each role of the pre-registered comparison: no_cot, cot, cot_reversed, pause, coconut
    (thoughts of the last hidden state), soft (thoughts of another soft token); the first config of each."""
    roles: dict[str, str] = {}
    for n, c in cfgs.items():
        mode = c.task.mode
        role = ("coconut" if c.soft.kind == "hidden" else "soft") if mode == "thoughts" else mode
        roles.setdefault(role, n)
    return roles


def _ci(d: dict | None) -> str:
    return f"{d['diff']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]" if d else "-"


def verdict(d: dict) -> str:
    """The pre-registered decision rule on an interval of A - B."""
    if d["lo"] > 0:
        return "better"
    if d["hi"] < 0:
        return "worse"
    if d["lo"] > -EQUIVALENCE and d["hi"] < EQUIVALENCE:
        return f"equivalent (the interval lies within ±{EQUIVALENCE})"
    return "not resolved"


def gate_passes(raw: dict[str, list[dict]]) -> dict[str, bool] | None:
    """Per config, whether every seed answers at least GATE of the depth-GATE_DEPTH questions; None for a task
    without such questions (no gate applies)."""
    names = list(raw)
    depths = {k for n in names for k in (raw[n][0].get("question_steps") or [])}
    if GATE_DEPTH not in depths:
        return None
    return {n: (x := at_depth(raw[n], GATE_DEPTH)) is not None and min(float(a.mean()) for a in x) >= GATE
            for n in names}


def warm_up_recall(run_dir: Path, cfg: Config) -> float | None:
    """The run's recall accuracy as its warm-up ended (its periodic eval at step task.recall_iters), or None without
    a warm-up or such an eval. Below about 1 the warm-up did not take, and the task phase starts without the lookup."""
    k = cfg.task.recall_iters
    path = run_dir / "metrics.jsonl"
    if not k or not path.is_file():
        return None
    rows = read_jsonl(path, "metrics")[0]
    return next((float(r["recall_accuracy"]) for r in rows if r.get("kind") == "eval" and r.get("step") == k
                 and isinstance(r.get("recall_accuracy"), int | float)), None)


def warm_up_lines(dirs: dict[str, list[Path]], cfgs: dict[str, Config]) -> list[str]:
    """The gate's companion: each seed's recall accuracy at the end of the warm-up, where a config has one."""
    rows = {n: [warm_up_recall(d, cfgs[n]) for d in dirs[n]] for n in dirs if cfgs[n].task.recall_iters}
    rows = {n: v for n, v in rows.items() if any(x is not None for x in v)}
    if not rows:
        return []
    return ["", "The warm-up, each seed: recall accuracy at its last step (the role pretraining plays; a seed whose "
                "warm-up did not reach about 1.00 starts the task without the lookup every question is made of).", "",
            "| config | recall accuracy at the warm-up's end, each seed |", "|---|---|",
            *(f"| {n} | {', '.join('-' if x is None else f'{x:.2f}' for x in v)} |" for n, v in rows.items())]


def task_steps(cfg: Config) -> int:
    """Optimizer steps that train on the task's questions: those that are not recall (warm-up or replay)."""
    return sum(not recall_at(cfg.task, step) for step in range(cfg.train.max_iters))


def depth_sections(raw: dict[str, list[dict]], cfgs: dict[str, Config],
                   dirs: dict[str, list[Path]] | None = None) -> list[str]:
    """For a task with depth-1 questions (twins): the gate (with each seed's warm-up, given the run folders), the
    positive control (CoT against no-CoT where no-CoT fails, and against the reversed chain), and the pre-registered
    comparison with its decision rule."""
    names = list(raw)
    depths = sorted({k for n in names for k in (raw[n][0].get("question_steps") or [])})
    if GATE_DEPTH not in depths:
        return []
    deepest, seeds = depths[-1], min(len(raw[n]) for n in names)
    at1 = {n: at_depth(raw[n], GATE_DEPTH) for n in names}
    gate = {n: [float(x.mean()) for x in at1[n]] if at1[n] is not None else [] for n in names}
    passes = gate_passes(raw) or {}
    out = ["## Gate", "",
           f"A model counts in a comparison only if it answers at least {GATE} of the depth-{GATE_DEPTH} questions "
           "(every seed): otherwise it is below the floor, and nothing is concluded from it.", "",
           f"| config | mode | depth-{GATE_DEPTH} accuracy, each seed | gate |", "|---|---|---|---|"]
    out += [f"| {n} | {_label(cfgs[n])} | {', '.join(f'{a:.3f}' for a in gate[n]) or 'no per-question results'} | "
            f"{'passes' if passes[n] else 'below the floor'} |" for n in names]
    out += warm_up_lines(dirs, cfgs) if dirs else []
    role = by_role({n: cfgs[n] for n in names})
    out += ["", "## Positive control", ""]
    control = False
    if "no_cot" not in role or "cot" not in role:
        out.append("Not run: the control needs a no-CoT and a CoT config in the sweep.")
    elif not (passes[role["no_cot"]] and passes[role["cot"]]):
        out.append("Not interpretable: no-CoT or CoT is below the floor.")
    else:
        nc, cot = role["no_cot"], role["cot"]
        fails = [d for d in depths if (x := at_depth(raw[nc], d)) is not None and x.mean() < GATE]
        if not fails:
            out.append(f"No-CoT answers at least {GATE} at every depth: there is no depth where a chain could help.")
        else:
            d = max(fails)
            c = paired_at(raw, cot, nc, d)
            control = c is not None and c["lo"] > 0
            out.append(f"At depth {d}, the largest where no-CoT fails (accuracy {at_depth(raw[nc], d).mean():.3f}), "
                       f"CoT minus no-CoT is {_ci(c)}: "
                       + ("the apparatus sees the effect a chain must have." if control else
                          "the runs are not comparable (other seeds or questions)." if c is None else
                          "the interval does not exclude zero, so the apparatus sees no effect where one must exist, "
                          "and the comparison below draws no conclusion."))
            if "cot_reversed" in role:
                r = paired_at(raw, cot, role["cot_reversed"], d)
                out += ["", f"The chain's order: CoT minus the same step tokens reversed (the first of them the "
                            f"answer) is {_ci(r)} at depth {d}: " + ("the order of the lookups is what helps, not the "
                                                                   "extra tokens." if r and r["lo"] > 0 else
                                                                   "not resolved.")]
    out += ["", "## The pre-registered comparison", "",
            f"Primary endpoint (docs/reasoning.md, stated before the runs): Coconut minus CoT accuracy at depth "
            f"{deepest}, paired by seed and question, bootstrap 95% interval; pre-registered with "
            f"{PREREGISTERED_SEEDS} seeds, this sweep has {seeds}. Decision rule: better if the interval is above "
            f"0, worse if below, equivalent if inside ±{EQUIVALENCE}, otherwise not resolved; it counts only if both "
            "models pass the gate and the positive control holds.", ""]
    if "coconut" not in role or "cot" not in role:
        out.append("Not run: the sweep has no Coconut or no CoT config.")
    else:
        co, cot = role["coconut"], role["cot"]
        p = paired_at(raw, co, cot, deepest)
        counts = passes[co] and passes[cot] and control and p is not None
        out.append(f"- **Primary**: {co} minus {cot} at depth {deepest}: {_ci(p)} -> "
                   + (f"**{verdict(p)}**" if counts else "no conclusion (" + ", ".join(
                       w for w, ok in (("Coconut below the floor", passes[co]), ("CoT below the floor", passes[cot]),
                                       ("the positive control does not hold", control),
                                       ("the runs are not comparable", p is not None)) if not ok) + ")")
                   + ("" if seeds >= PREREGISTERED_SEEDS else f"; {seeds} of the {PREREGISTERED_SEEDS} "
                      "pre-registered seeds, so this is a pilot"))
        if "pause_curriculum" in role:  # the strongest null: the same curriculum and slots, nothing fed back
            n = role["pause_curriculum"]
            out.append(f"- Secondary: {co} minus {n} (the same curriculum with pause tokens) at depth {deepest}: "
                       f"{_ci(paired_at(raw, co, n, deepest))}")
        for r in ("pause", "pause_curriculum", "soft", "cot_reversed", "no_cot"):
            if r in role:
                n = role[r]
                out.append(f"- Secondary: {n} ({_label(cfgs[n])}) minus {cot} at depth {deepest}: "
                           f"{_ci(paired_at(raw, n, cot, deepest))}"
                           + ("" if passes[n] else " (below the floor: no conclusion)"))
    return [*out, ""]


class ReasoningStudy(Study):
    """Reasoning-task configs: each mode's greedy test accuracy, scored once after training."""

    name = "reasoning"

    def evaluate(self, run_dir: Path, cfg: Config, seed: int) -> dict:
        # the test split, once, with the final checkpoint (chosen on nothing)
        return evaluate_task_run(run_dir, cfg.task.name, Path(cfg.data.dir) / "test.json", cfg.train.device)

    def columns(self) -> list[str]:
        return columns()

    def bar_metrics(self) -> list[str]:
        return BAR_METRICS

    def plots(self, results: Results) -> list[str]:
        o = self.options
        loss, bars = super().plots(results)
        plot_accuracy(list(results.table), o.seeds, o.base_seed, o.out, results.configs)
        return [loss, "accuracy_curves.png", bars]

    def setup(self, results: Results) -> str:
        return SETUP

    def sections(self, results: Results) -> list[str]:
        return depth_sections(results.raw, results.configs, results.dirs) + \
            report_sections(results.table, results.raw, results.configs)
