"""The context-layout study (docs/context.md): fraction of the gap closed per seed, the columns and bars of its
table, and the collapse-threshold trade-off of free-running soft generation (coherence against nuance)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from softar.evaluate.context import PASSKEY_DISTANCES, RECOVERY_HISTORY, fraction_of_gap

GENERATION_FILE = "generation.json"

COLUMNS = (["loss", "loss_hard_slots", "loss_soft_slots", "loss_minus_short", "gap_closed"]
           + [f"recovery.{RECOVERY_HISTORY[0]}.segment.recall_at_k"]
           + [f"recovery.{RECOVERY_HISTORY[-1]}.{kind}.{m}" for kind in ("segment", "aggregate")
              for m in ("recall_at_k", "chance")]
           + [f"passkey.{n}.{m}" for n in PASSKEY_DISTANCES[::2] for m in ("accuracy", "logp_gain")])
BAR_METRICS = ["loss", "loss_minus_short", f"recovery.{RECOVERY_HISTORY[-1]}.aggregate.recall_at_k",
               f"passkey.{PASSKEY_DISTANCES[1]}.logp_gain", f"passkey.{PASSKEY_DISTANCES[-1]}.logp_gain"]


def add_gap_closed(rows: dict[str, list[dict]], short: str, long: str) -> None:
    """Give every run, paired by seed, the fraction of the gap closed between the short and the long plain window,
    (L_short - L_run) / (L_short - L_long), and its loss difference to the short window, L_run - L_short (whole val
    split)."""
    for runs in rows.values():
        for i, r in enumerate(runs):
            r["gap_closed"] = fraction_of_gap(rows[short][i]["loss"], r["loss"], rows[long][i]["loss"])
            r["loss_minus_short"] = r["loss"] - rows[short][i]["loss"]


def tradeoff(out: Path, generator: str, reference: str, seeds: int, base_seed: int) -> list[dict]:
    """Run (or reuse) the generation report of each seed's generator run scored by the same seed's reference run;
    return per threshold the mean and std over seeds, and plot tradeoff.png."""
    import torch

    from softar.data.dataset import load_split
    from softar.evaluate.generation import generation_report
    from softar.rundir import load_run

    per_seed = []
    for s in range(seeds):
        gen_dir, ref_dir = (out / "runs" / f"{name}_s{base_seed + s}" for name in (generator, reference))
        path = gen_dir / GENERATION_FILE
        if not path.is_file():
            device = torch.device("cpu")
            run, ref = load_run(gen_dir, device), load_run(ref_dir, device)
            rows = generation_report(run.model, ref.model, load_split(run.cfg.data.dir, "val"))
            path.write_text(json.dumps(rows, indent=2))
        per_seed.append(json.loads(path.read_text()))
    summary = []
    for i, row in enumerate(per_seed[0]):
        cell = {"threshold": row["threshold"]}
        for key in ("soft_fraction", "reference_ppl", "repeated_4grams", "ood_mean"):
            vals = [rows[i][key] for rows in per_seed]
            cell[key] = (statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0)
        cell["ood_over_time"] = [statistics.fmean(v) for v in zip(*(rows[i]["ood_over_time"] for rows in per_seed),
                                                                   strict=True)]
        summary.append(cell)
    _plot_tradeoff(summary, out / "tradeoff.png", generator, reference)
    return summary


def _plot_tradeoff(summary: list[dict], path: Path, generator: str, reference: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    x = [c["soft_fraction"][0] for c in summary]
    for ax, key, label in ((axes[0], "reference_ppl", f"perplexity under {reference} (lower: more coherent)"),
                           (axes[1], "repeated_4grams", "repeated 4-grams")):
        ax.errorbar(x, [c[key][0] for c in summary], xerr=[c["soft_fraction"][1] for c in summary],
                    yerr=[c[key][1] for c in summary], marker="o", capsize=3)
        for c in summary:
            ax.annotate(f"{c['threshold']:g}", (c["soft_fraction"][0], c[key][0]), fontsize=7,
                        textcoords="offset points", xytext=(4, 4))
        ax.set(xlabel="tokens that re-entered soft (nuance)", ylabel=label)
    for c in summary:
        axes[2].plot([32 * i + 16 for i in range(len(c["ood_over_time"]))], c["ood_over_time"],
                     label=f"threshold {c['threshold']:g}")
    axes[2].set(xlabel="generated tokens", ylabel="entropy of the LM distribution (nats)", title="OOD score over time")
    axes[2].legend(fontsize=6)
    fig.suptitle(f"{generator}: collapse threshold on entropy (labels), mean ± std over seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


HOW_TO_READ = """## How to read this

Each config's window is `model.block_size` slots, `[aggregate][segments][hard][soft]` (`softar/soft/window.py`). A
segment slot is the embedding arithmetic (sum, mean, sum/sqrt(n) or decayed sum: `context.op`) of one span of the
history just before the hard region; the aggregate covers everything older, up to `context.max_history` tokens in
training and evaluation (unbounded in generation). Soft slots hold the model's own expected embeddings from a first
pass. The configs are compared at equal training tokens (predicted tokens per step x steps), not equal FLOPs: summary
slots add slots to every window, and a soft region adds a forward pass without gradients (a third of a training
step). Columns:

- `loss`: cross-entropy over every val token, each predicted once from consecutive windows of the token slots, each
  window with its history (`loss_hard_slots` / `loss_soft_slots`: the positions whose inputs are true tokens / the
  model's own soft tokens; the latter is an open-loop loss);
- `loss_minus_short`, `gap_closed`: the loss difference to the short plain window and the fraction of the gap
  closed, both paired by seed (below);
- `recovery.N.KIND.recall_at_k`: with N tokens of history, rank the vocabulary by cosine to a summary slot and count
  how many of the k distinct tokens the slot holds are in the top k (embedding arithmetic alone, no model; `chance`:
  k / V);
- `passkey.N.*`: a random token pair (a, x) planted N tokens before the end of a stretch of val text that ends in a:
  top-1 accuracy of x, and the gain in log p(x) over the same text without the plant (exactly 0 when the plant is
  outside everything the model sees).
"""


def report_sections(table: dict, gap: tuple[str, str] | None, generation: tuple[str, str] | None,
                    tradeoff_rows: list[dict] | None) -> list[str]:
    lines = [HOW_TO_READ]
    if gap is not None:
        short, long = gap
        lines += ["## Fraction of the gap closed", "",
                  f"(L_{short} - L_config) / (L_{short} - L_{long}), whole val split, paired by seed: 0 means the "
                  "extra slots add nothing, 1 means as good as the plain window four times larger.", ""]
        width = table[short]["loss"][0] - table[long]["loss"][0]
        if width <= 0:
            lines += [f"**At this budget there is no gap to close**: {long} is *worse* than {short} by "
                      f"{-width:.4f} nats, so the fraction (a ratio with a negative denominator) means nothing; read "
                      f"each config's val loss against {short} instead (a negative difference: the extra slots help).",
                      ""]
        for name, cols in table.items():
            if name in gap:
                continue
            f, sd = cols["gap_closed"]
            dl, dl_sd = cols["loss_minus_short"]
            lines.append(f"- **{name}**: {f:.3f} ± {sd:.3f} (val loss {cols['loss'][0]:.4f}; {dl:+.4f} ± {dl_sd:.4f} "
                         f"vs {short}, paired by seed)")
        lines.append("")
    if tradeoff_rows is not None:
        gen, ref = generation
        lines += ["## Coherence against nuance", "",
                  f"Free-running soft generation from {gen} (8 val prompts of 64 tokens, 256 new tokens, expected "
                  "embeddings as soft tokens, shown tokens sampled from the LM head at temperature 0.8, top-k 200), "
                  "with soft tokens collapsed in place when the entropy of their distribution is above the threshold. "
                  f"Coherence: perplexity of the shown text under {ref}. Nuance: the fraction of generated tokens that "
                  "re-entered the context soft. Threshold 0 is ordinary sampling; inf collapses by age only.", "",
                  "| threshold | re-entered soft | reference perplexity | repeated 4-grams | mean entropy |",
                  "|---|---|---|---|---|"]
        for c in tradeoff_rows:
            cells = [f"{c[k][0]:.3f} ± {c[k][1]:.3f}" for k in ("soft_fraction", "reference_ppl", "repeated_4grams",
                                                                  "ood_mean")]
            lines.append(f"| {c['threshold']:g} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines
