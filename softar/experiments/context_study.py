"""The context-layout study (docs/layouts.md): the columns and bars of its table, and the collapse-threshold
trade-off of free-running soft generation (coherence against nuance). What the summary slots retain is the retention
study's (`softar.experiments.retention_study`, docs/context.md)."""

from __future__ import annotations

import json
from pathlib import Path

from softar import SoftarError
from softar.config import Config
from softar.disk import strict_json, write_text_atomic
from softar.evaluate.context import RECOVERY_HISTORY
from softar.evaluate.generation import POLICIES, frontier_gap
from softar.evaluate.stats import mean_std
from softar.experiments.study import Results, Study, analogy_section, evaluate_lm_run, save_figure

GENERATION_FILE = "generation.json"

COLUMNS = (["loss", "loss_hard_slots", "loss_soft_slots", "loss_soft_slots_one_step"]
           + [f"recovery.{RECOVERY_HISTORY[0]}.segment.recall_at_k"]
           + [f"recovery.{RECOVERY_HISTORY[-1]}.{kind}.{m}" for kind in ("segment", "aggregate")
              for m in ("recall_at_k", "prior_recall_at_k", "chance")])
REPORT_COLUMNS = ["loss", "loss_soft_slots", "loss_soft_slots_one_step",
                  f"recovery.{RECOVERY_HISTORY[-1]}.aggregate.recall_at_k"]
BAR_METRICS = ["loss", f"recovery.{RECOVERY_HISTORY[-1]}.aggregate.recall_at_k"]


METRICS = ("soft_fraction", "reference_ppl", "distinct_2", "distinct_3", "repeated_4grams", "brier2")


def tradeoff(out: Path, generator: str, reference: str, seeds: int, base_seed: int) -> dict[str, list[dict]]:
    """Run (or reuse) the coherence-against-nuance report of each seed's generator run scored by the same seed's
    reference run; return per group (frontier, each policy) and setting the mean and std over seeds of each metric
    and of its perplexity gap to the frontier (paired by seed), and plot tradeoff.png."""
    import torch

    from softar.data.dataset import load_split
    from softar.evaluate.generation import generation_report
    from softar.rundir import load_run

    per_seed = []
    for s in range(seeds):
        gen_dir, ref_dir = (out / "runs" / f"{name}_s{base_seed + s}" for name in (generator, reference))
        path = gen_dir / GENERATION_FILE
        try:  # the sweep's own file: reused when it is a complete report, remade otherwise
            rows = json.loads(path.read_text()) if path.is_file() and not path.is_symlink() else None
        except (OSError, ValueError):
            rows = None
        if not _complete(rows):
            device = torch.device("cpu")
            run, ref = load_run(gen_dir, device), load_run(ref_dir, device)
            rows = generation_report(run.model, ref.model, load_split(run.cfg.data.dir, "val"))
            write_text_atomic(path, strict_json(rows, indent=2))
        per_seed.append(rows)
    summary: dict[str, list[dict]] = {}
    for group, points in per_seed[0].items():
        summary[group] = []
        for i, point in enumerate(points):
            cell = {k: point[k] for k in ("temperature", "top_p", "threshold") if k in point}
            runs = [rows[group][i] for rows in per_seed]
            for key in METRICS:
                cell[key] = mean_std([r[key] for r in runs])
            gaps = [frontier_gap(rows["frontier"], r) for rows, r in zip(per_seed, runs, strict=True)]
            cell["ppl_gap"] = mean_std(gaps) if group != "frontier" and None not in gaps else None
            cell["all_seeds_beyond"] = cell["ppl_gap"] is not None and all(g < 0 for g in gaps)
            summary[group].append(cell)
    _plot_tradeoff(summary, out / "tradeoff.png", generator, reference)
    return summary


def _complete(rows) -> bool:
    """Whether a stored generation report has every group and every figure the summary reads."""
    return (isinstance(rows, dict) and set(rows) == {"frontier", *POLICIES}
            and all(isinstance(points, list) and points and all(
                isinstance(p, dict) and all(isinstance(p.get(k), int | float) for k in METRICS) for p in points)
                for points in rows.values())
            and len(rows["collapse_uncertain"]) == len(rows["keep_uncertain"]))


def _label(cell: dict) -> str:
    return f"T{cell['temperature']:g} p{cell['top_p']:g}" if "temperature" in cell else f"{float(cell['threshold']):g}"


def _plot_tradeoff(summary: dict[str, list[dict]], path: Path, generator: str, reference: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    for ax, key, label in ((axes[0], "reference_ppl", f"perplexity under {reference} (lower: more coherent)"),
                           (axes[1], "brier2", "Brier-2 against the true continuation (higher: better)")):
        for group, style in (("frontier", "k-o"), ("collapse_uncertain", "C0-s"), ("keep_uncertain", "C1-^")):
            cells = sorted(summary[group], key=lambda c: c["distinct_2"][0])
            xs = [c["distinct_2"][0] for c in cells]
            ax.errorbar(xs, [c[key][0] for c in cells], yerr=[c[key][1] for c in cells], fmt=style, capsize=2,
                        label="plain sampling (T, top-p)" if group == "frontier" else group.replace("_", " "))
            for c in cells:
                ax.annotate(_label(c), (c["distinct_2"][0], c[key][0]), fontsize=6, textcoords="offset points",
                            xytext=(3, 3))
        ax.set(xlabel="distinct 2-grams of the shown text (diversity)", ylabel=label)
        ax.legend(fontsize=7)
    fig.suptitle(f"{generator}: coherence against nuance; soft policies labelled by entropy threshold (nats), "
                 "mean ± std over seeds", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


HOW_TO_READ = """## How to read this

Each config's window is `model.block_size` slots, `[aggregate][segments][hard][soft]` (`softar/soft/window.py`). A
segment slot is the embedding arithmetic (sum, mean, sum/sqrt(n) or decayed sum: `context.op`) of one span of the
history just before the hard region; the aggregate covers everything older, up to `context.max_history` tokens in
training and evaluation (unbounded in generation). Soft slots hold the model's own expected embeddings: in training
guessed in one pass from the true tokens before them (`context.soft_fill = "one_step"`, the default), in evaluation
filled by a real step-by-step soft rollout (the first K generated tokens after true text). The configs are compared
at equal training tokens (predicted tokens per step x steps), not equal FLOPs: summary slots add slots to every
window, and a soft region adds a forward pass without gradients (a third of a training step). Columns:

- `loss`: cross-entropy over every val token, each predicted once from consecutive windows of the token slots, each
  window with its history (`loss_hard_slots` / `loss_soft_slots`: the positions whose inputs are true tokens / the
  model's own soft tokens, filled by a rollout: an open-loop loss; `loss_soft_slots_one_step`: the same positions
  with each soft slot guessed from the true tokens before it, the figure earlier versions reported);
- `recovery.N.KIND.recall_at_k`: with N tokens of history, rank the vocabulary by cosine to a summary slot and count
  how many of the k distinct tokens the slot holds are in the top k (embedding arithmetic alone, no model; `chance`:
  k / V; `prior_recall_at_k`: the same for the ranking by train-split frequency, which never reads the history). What
  the model makes of the summary slots, on identical targets against controls, is the retention study's
  (docs/context.md).
"""


def report_sections(table: dict, generation: tuple[str, str] | None,
                    tradeoff_rows: dict[str, list[dict]] | None) -> list[str]:
    lines = [HOW_TO_READ, "| config | " + " | ".join(REPORT_COLUMNS) + " |", "|---" * (len(REPORT_COLUMNS) + 1) + "|"]
    for name, cols in table.items():
        lines.append(f"| {name} | " + " | ".join(f"{cols[c][0]:.4g} ± {cols[c][1]:.2g}" if c in cols else ""
                                                 for c in REPORT_COLUMNS) + " |")
    lines.append("")
    if tradeoff_rows is not None:
        lines += coherence_section(tradeoff_rows, *generation)
    return lines


def coherence_section(rows: dict[str, list[dict]], gen: str, ref: str) -> list[str]:
    """The coherence-against-nuance tables and the plain verdict: does any soft policy lie beyond the frontier?"""
    lines = ["## Coherence against nuance", "",
             f"Free-running generation from {gen}: 64 val prompts of 64 tokens, 64 new tokens, the same prompts for "
             f"every setting. Coherence: perplexity of the shown text under {ref}, the strongest plain model. "
             "Diversity: distinct 2- and 3-grams of the shown text. Brier-2: of the first two shown tokens against "
             "the true continuation (16 draws per prompt). The **frontier** is the model's own plain sampling across "
             "temperature (0.6 to 1.2) and top-p (0.9, 1): what any sampler buys. The soft policies let expected "
             "embeddings re-enter (shown tokens sampled at temperature 1) and collapse in place either the "
             "*uncertain* tokens (entropy above the threshold) or the *confident* ones (`keep_uncertain`: entropy "
             "below it). `gap` is the perplexity minus the frontier's at the same distinct-2 (the plain-sampling "
             "points no other dominates, joined by lines; negative: beyond the frontier), paired by seed; blank "
             "when the soft text is more diverse than any plain sampling. Mean ± std over seeds; a setting counts "
             "as beyond the frontier only when it is in every seed.", ""]
    for group, cells in rows.items():
        key = "T, top-p" if group == "frontier" else "threshold"
        lines += [f"**{group}**", "", f"| {key} | soft | perplexity | distinct-2 | distinct-3 | Brier-2 | gap |",
                  "|---|---|---|---|---|---|---|"]
        for c in cells:
            vals = [f"{c[k][0]:.3f} ± {c[k][1]:.3f}" for k in ("soft_fraction", "reference_ppl", "distinct_2",
                                                                "distinct_3", "brier2")]
            gap = f"{c['ppl_gap'][0]:+.2f} ± {c['ppl_gap'][1]:.2f}" if c.get("ppl_gap") else ""
            lines.append(f"| {_label(c)} | " + " | ".join(vals) + f" | {gap} |")
        lines.append("")
    beyond = [(g, c) for g in POLICIES for c in rows[g] if c.get("all_seeds_beyond") and c["soft_fraction"][0] > 0]
    if beyond:
        names = ", ".join(f"{g} at {_label(c)} ({c['ppl_gap'][0]:+.2f} ± {c['ppl_gap'][1]:.2f})" for g, c in beyond)
        lines += [f"**Verdict: beyond the frontier** (perplexity below plain sampling's at equal diversity, in every "
                  f"seed): {names}.", ""]
    else:
        lines += ["**Verdict: no soft policy lies beyond the frontier.** At every setting where tokens re-entered "
                  "soft, plain sampling at some temperature and top-p gives text at least as coherent at the same "
                  "diversity in at least one seed, or the soft text is more diverse than any plain sampling "
                  "(no comparison).", ""]
    return lines


class LayoutStudy(Study):
    """`softar sweep ... --generation GENERATOR REFERENCE`: the layouts' losses and recovery, and the coherence
    against nuance of the generator's free-running soft generation, scored by the plain reference."""

    name = "context layouts"

    def check(self) -> None:
        gen, ref = self.options.generation
        for name in (gen, ref):
            if name not in self.configs:
                raise SoftarError(f"sweep --generation: {name!r} is not one of the configs ({', '.join(self.configs)})")
        if not self.configs[ref].context.plain:
            raise SoftarError(f"sweep --generation: the reference {ref!r} has a context layout; it must be a plain "
                              "hard-token config")
        if self.configs[gen].context.plain:
            raise SoftarError(f"sweep --generation: the generator {gen!r} has no context layout; the trade-off is "
                              "measured on a layout config")

    def evaluate(self, run_dir: Path, cfg: Config, seed: int) -> dict:
        return evaluate_lm_run(run_dir, cfg, self.options, analogies=self.options.analogies)

    def stale(self, kept: dict, seed: int) -> bool:
        return self.options.analogies is not None and "analogies" not in kept

    def columns(self) -> list[str]:
        return list(COLUMNS)

    def bar_metrics(self) -> list[str]:
        return BAR_METRICS

    def plot_tradeoff(self) -> str:
        """Score (or reuse) each seed's generation report and draw tradeoff.png -> its name."""
        o = self.options
        self.tradeoff = tradeoff(o.out, *o.generation, o.seeds, o.base_seed)
        return "tradeoff.png"

    def plots(self, results: Results) -> list[str]:
        return [*super().plots(results), self.plot_tradeoff()]

    def sections(self, results: Results) -> list[str]:
        lines = report_sections(results.table, self.options.generation, self.tradeoff)
        return lines + (analogy_section(results.raw) if self.options.analogies is not None else [])
