"""The soft-token study (docs/soft-tokens.md): one narrow table per question, every comparison paired over the same
seeds and windows with a bootstrap interval.

- nuance: does soft feedback beat the strongest baselines in open-loop loss: averaged sampled rollouts (the model's
  own k-step prediction), a constant vector fed back, the unigram prior? At what number of averaged rollouts does
  it break even (soft feedback costs about one)?
- representation: soft-token definitions x embedding spaces x losses;
- the seed's claim, re-checked against `sampled_avg_2` (about equal compute) and the constant vectors."""

from __future__ import annotations

import statistics
from functools import partial
from pathlib import Path

from softar.config import Config
from softar.evaluate.soft_tokens import AVERAGED_KNOWN, CONSTANTS, effective_samples, format_effective
from softar.evaluate.stats import mean_std, paired_bootstrap_2way
from softar.experiments.study import Results, Study, analogy_section, evaluate_lm_run
from softar.soft.tokens import SOFT_TOKENS

SOFT_MODES = tuple(f"soft_{kind}" for kind in SOFT_TOKENS)  # open-loop feedback with each registered soft token
BASELINES = ("greedy", "greedy_calibrated", *(f"sampled_avg_{s}" for s in AVERAGED_KNOWN), *CONSTANTS, "unigram",
             "bayes")
GATE = 0.02  # on data with a known optimum, a config's claim counts only within 2% of the Bayes loss


def columns(horizons: tuple[int, ...]) -> list[str]:
    """Every metric, for the CSV."""
    cols = ["loss", "bits_per_token", "readout.temperature", "soft_outputs.lm_top1",
            *(f"soft_outputs.{kind}.{m}" for m in ("nn_top1", "l2_r") for kind in SOFT_TOKENS),
            *(f"brier.{k}{se}" for k in ("brier1", "brier2", "brier3", "brier4", "brierlm") for se in ("", "_se")),
            "embedding.effective_rank", "embedding.mean_row_norm", "embedding.mean_pairwise_cosine",
            "embedding.nn_spacing", "bayes_loss", "bayes_loss_full", "bayes_gap"]
    for k in horizons:
        cols += [f"{part}.{k}.{m}" for part in ("open_loop", "positive_control")
                 for m in ("teacher", *BASELINES, *SOFT_MODES, "effective_samples")]
    return cols


def bar_metrics(horizons: tuple[int, ...]) -> list[str]:
    return ["loss", "brier.brierlm"] + [f"open_loop.{k}.{m}" for k in horizons
                                        for m in ("sampled_avg_2", "constant_unigram", "soft_expected")]


def _windows(run: dict, k: int, mode: str, part: str = "open_loop") -> list[float] | None:
    return run.get(part, {}).get(str(k), {}).get("per_window", {}).get(mode)


def _pooled(runs_a: list[dict], runs_b: list[dict], get_a, get_b, seed: int = 0) -> dict | None:
    """get_a(run) minus get_b(run), paired run by run (the same seed) and window by window (every run of a sweep is
    evaluated on the same windows): the mean and a two-way bootstrap 95% interval that resamples seeds and windows.
    None when a run lacks either, or the runs do not pair up."""
    if len(runs_a) != len(runs_b) or not runs_a:
        return None
    a, b = [get_a(r) for r in runs_a], [get_b(r) for r in runs_b]
    if any(x is None for x in a + b) or len({len(x) for x in a + b}) != 1:
        return None
    return paired_bootstrap_2way(a, b, seed=seed)


def _own_soft_windows(run: dict, k: int) -> list[float] | None:
    return _windows(run, k, run.get("open_loop", {}).get(str(k), {}).get("soft_feedback", ""))


def _brier1_windows(run: dict) -> list[float] | None:
    return run.get("brier", {}).get("per_window", {}).get("brier1")


def paired(runs: list[dict], k: int, mode: str, other: str, seed: int = 0, part: str = "open_loop") -> dict | None:
    """mode minus other, open-loop loss at horizon k, within one config's runs, paired over every (seed, window);
    `part="positive_control"`: the same for the HMM oracle evaluated beside them."""
    return _pooled(runs, runs, lambda r: _windows(r, k, mode, part), lambda r: _windows(r, k, other, part), seed)


def against_baseline_section(table: dict, raw: dict[str, list[dict]], horizons: tuple[int, ...]) -> list[str]:
    """Each config minus its dataset's cross-entropy baseline (`<dataset>_ce`), paired by seed (val loss) and by seed
    and window (open-loop loss of each one's own soft feedback, Brier-1)."""
    ks = ", ".join(f"K = {k}" for k in horizons)
    lines = ["### Against the baseline config, paired", "",
             "Each config minus its dataset's `_ce` baseline, the same seeds and the same windows: val loss (mean "
             f"± std of the per-seed differences), the open-loop loss of each one's own soft feedback ({ks}) and "
             "Brier-1 (higher is better), each with a bootstrap 95% interval over seeds x windows.", "",
             "| config | val loss | " + " | ".join(f"soft feedback K = {k}" for k in horizons) + " | Brier-1 |",
             "|---|---|" + "---|" * len(horizons) + "---|"]
    for name, runs in raw.items():
        base_name = name.split("_")[0] + "_ce"
        if base_name == name or base_name not in raw:
            continue
        base = raw[base_name]
        dl = [r["loss"] - b["loss"] for r, b in zip(runs, base, strict=False)]
        cells = ["{:+.4f} ± {:.4f}".format(*mean_std(dl))]
        for k in horizons:
            own = partial(_own_soft_windows, k=k)
            cells.append(_cell(_pooled(runs, base, own, own)))
        cells.append(_cell(_pooled(runs, base, _brier1_windows, _brier1_windows)))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines + [""]


def _cell(d: dict | None) -> str:
    return f"{d['diff']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]" if d else ""


def _ms(table: dict, name: str, col: str, digits: int = 3) -> str:
    v = table[name].get(col)
    return f"{v[0]:.{digits}f} ± {v[1]:.{digits}f}" if v else "-"


def nuance_section(table: dict, raw: dict[str, list[dict]], k: int) -> list[str]:
    lines = [f"### Nuance at K = {k}", "",
             "| config | soft | vs avg 1 | vs avg 2 | vs avg 16 | vs const | vs unigram | S* |",
             "|---|---|---|---|---|---|---|---|"]
    for name, runs in raw.items():
        mode = runs[0].get("open_loop", {}).get(str(k), {}).get("soft_feedback")
        if mode is None:
            continue
        const = min(CONSTANTS, key=lambda c: table[name].get(f"open_loop.{k}.{c}", (float("inf"),))[0])
        diffs = [paired(runs, k, mode, other) for other in ("sampled_avg_1", "sampled_avg_2", "sampled_avg_16",
                                                            const, "unigram")]
        s_star = _effective(runs, k, mode)
        lines.append(f"| {name} | {mode} {_ms(table, name, f'open_loop.{k}.{mode}')} | "
                     + " | ".join(_cell(d) for d in diffs) + f" | {s_star} |")
    return lines + [""]


def _effective(runs: list[dict], k: int, mode: str, part: str = "open_loop") -> str:
    """S* per seed, with whether it lies within the measured S or is censored at an end of it."""
    cells = []
    for run in runs:
        ol = run[part][str(k)]
        measured = {int(m.rsplit("_", 1)[1]): v for m, v in ol.items() if m.startswith("sampled_avg_")}
        cells.append(format_effective(*effective_samples(measured, ol[mode])))
    return ", ".join(cells)


def representation_section(table: dict, raw: dict[str, list[dict]], horizons: tuple[int, ...]) -> list[str]:
    k = horizons[0]
    kinds = [m for m in SOFT_MODES if any(f"open_loop.{k}.{m}" in cols for cols in table.values())]
    lines = [f"### Representation: soft definitions x embedding spaces x losses (open loop at K = {k})", "",
             "Whole-val loss, BrierLM (the mean over the seeds where every Brier-n is positive, with the mean of "
             "their standard errors over windows, and how many seeds that is), the round-trip gap of the expected "
             "embedding in units of E's nearest-neighbour spacing, and the open-loop loss with each soft token fed "
             "back (mean ± std over seeds). Regression-only configs are read through softmax(cos(y, E) / "
             "tau), tau fitted on train.", "",
             "| config | val loss | BrierLM | l2-r |" + "".join(f" {k} |" for k in kinds),
             "|---|---|---|---|" + "---|" * len(kinds)]
    for name in table:
        cells = [_ms(table, name, "loss"), _brierlm(raw[name]), _ms(table, name, "soft_outputs.expected.l2_r", 2)]
        cells += [_ms(table, name, f"open_loop.{k}.{m}") for m in kinds]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines + [""]


def _brierlm(runs: list[dict]) -> str:
    if not any("brier" in r for r in runs):
        return "not measured"
    got = [r["brier"] for r in runs if r.get("brier", {}).get("brierlm") is not None]
    if not got:
        return "unresolved"
    mean = statistics.fmean(b["brierlm"] for b in got)
    se = statistics.fmean(b["brierlm_se"] for b in got)
    return f"{mean:.3f} ± {se:.3f} ({len(got)}/{len(runs)})"


def claims(table: dict, raw: dict[str, list[dict]], horizons: tuple[int, ...]) -> list[str]:
    """The seed's claim per config, for its own soft feedback (named in its config before any result, so one
    comparison per config and no choosing among modes): it beats `sampled_avg_2` (about equal compute) and every
    constant vector in open-loop loss at every horizon, each paired interval below 0, with the config's val loss
    within 2% of its dataset's cross-entropy baseline (`<dataset>_ce`), or, where the optimum is known, of the
    Bayes loss (the gate)."""
    lines = []
    for name, runs in raw.items():
        base = table.get(name.split("_")[0] + "_ce")
        ratio = table[name]["loss"][0] / base["loss"][0] - 1 if base else None
        if _gap(table, name) is not None:
            base, ratio = None, _gap(table, name)
        mode = runs[0].get("open_loop", {}).get(str(horizons[0]), {}).get("soft_feedback")
        if mode is None:
            lines.append(f"- **{name}**: not measured (no open-loop figures: a context layout, or no horizon fits "
                         "its window)")
            continue
        results = [paired(runs, k, mode, other) for k in horizons for other in ("sampled_avg_2", *CONSTANTS)]
        wins = all(r is not None and r["hi"] < 0 for r in results)
        within = ratio is not None and ratio <= GATE
        note = "the baseline itself" if base is table[name] else \
            (f"val loss {ratio:+.1%} vs Bayes" if _gap(table, name) is not None else
             f"val loss {ratio:+.1%} vs baseline" if ratio is not None else "no baseline")
        if wins and within:
            lines.append(f"- **{name}**: holds for {mode} ({note})")
        elif wins:
            lines.append(f"- **{name}**: {mode} wins, but the model pays for it: {note}")
        else:
            lines.append(f"- **{name}**: does not hold: {mode} does not beat both `sampled_avg_2` and every "
                         f"constant vector at every horizon ({note})")
    return lines


def _gap(table: dict, name: str) -> float | None:
    v = table[name].get("bayes_gap")
    return None if v is None else v[0]


def known_answer_section(table: dict, raw: dict[str, list[dict]], horizons: tuple[int, ...]) -> list[str]:
    """Configs trained on data whose optimum is known (`softar prepare --synthetic hmm`): the gate (val loss within
    2% of the Bayes loss), the positive control (the HMM's own Bayes filter through the same engine and code, where
    soft feedback must win), and each config's own soft feedback against averaged rollouts and the Bayes ceiling."""
    known = [name for name in raw if _gap(table, name) is not None]
    if not known:
        return []
    lines = ["## Known answer: soft feedback on a hidden Markov model", "",
             "The data are a hidden Markov model's symbols (`softar prepare --synthetic hmm`), so the best possible "
             "figures are computed exactly by the forward algorithm: the Bayes loss of the very targets the model is "
             "scored on, each read from its window's start as the model reads it, and the Bayes open-loop loss, the "
             "exact K-step prediction b A^k B from the prefix alone (no rollout can beat it).", "",
             f"**Gate.** A config's comparisons count only if its val loss is within {GATE:.0%} of the Bayes loss "
             "(mean over seeds).", "",
             "| config | val loss | Bayes loss | gap | gate |", "|---|---|---|---|---|"]
    for name in known:
        gap = _gap(table, name)
        lines.append(f"| {name} | {_ms(table, name, 'loss', 4)} | {_ms(table, name, 'bayes_loss', 4)} | "
                     f"{gap:+.2%} | {'passed' if gap <= GATE else 'below the floor'} |")
    lines += ["", "**Positive control.** The HMM's own Bayes filter as a model (`softar.model.oracle`): it reads a "
              "slot as a distribution over what was emitted, so its expected embedding fed back is exact "
              "marginalisation and must match the Bayes ceiling, while one sampled rollout loses the belief. It runs "
              "through the same engine and the same open-loop code, on the same windows, as every config.", "",
              "| K | soft (oracle) | Bayes | avg 1 | avg 2 | avg 64 | soft − avg 2 | soft − Bayes | S* |",
              "|---|---|---|---|---|---|---|---|---|"]
    runs = raw[known[0]]  # the oracle is the same for every config: the same data, windows and draws
    for k in horizons:
        if _windows(runs[0], k, "soft_expected", "positive_control") is None:
            continue
        cells = [_ms(table, known[0], f"positive_control.{k}.{m}") for m in
                 ("soft_expected", "bayes", "sampled_avg_1", "sampled_avg_2", "sampled_avg_64")]
        cells += [_cell(paired(runs, k, "soft_expected", other, part="positive_control"))
                  for other in ("sampled_avg_2", "bayes")]
        cells.append(_effective(runs[:1], k, "soft_expected", "positive_control"))
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    lines += ["", "**Each config's own soft feedback** (its `[soft]` kind) against averaged sampled rollouts, the best "
              "constant vector and the Bayes ceiling: open-loop loss (mean ± std over seeds) and paired differences "
              "(soft minus the other, nats, bootstrap 95% interval over seeds x windows; negative: soft is better).",
              ""]
    for k in horizons:
        lines += [f"K = {k}:", "",
                  "| config | soft | avg 2 | avg 64 | best const | Bayes | soft − avg 2 | soft − const | "
                  "soft − Bayes | S* |", "|---|---|---|---|---|---|---|---|---|---|"]
        for name in known:
            mode = raw[name][0].get("open_loop", {}).get(str(k), {}).get("soft_feedback")
            if mode is None:
                continue
            const = min(CONSTANTS, key=lambda c: table[name].get(f"open_loop.{k}.{c}", (float("inf"),))[0])
            cells = [f"{mode} {_ms(table, name, f'open_loop.{k}.{mode}')}"]
            cells += [_ms(table, name, f"open_loop.{k}.{m}") for m in ("sampled_avg_2", "sampled_avg_64", const,
                                                                       "bayes")]
            cells += [_cell(paired(raw[name], k, mode, other)) for other in ("sampled_avg_2", const, "bayes")]
            cells.append(_effective(raw[name], k, mode))
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def report_sections(table: dict, raw: dict[str, list[dict]], horizons: tuple[int, ...]) -> list[str]:
    lines = [*known_answer_section(table, raw, horizons),
             "## Nuance: does soft feedback carry information the baselines lack?", "",
             "Open-loop loss of each config's own soft feedback (`soft`, its `[soft]` kind), and its paired "
             "difference to each baseline (soft minus baseline, nats; negative: soft is better) with a bootstrap 95% "
             "interval. `avg S`: the mean probability over S sampled rollouts, the model's own K-step prediction; "
             "`const`: the best of the constant vectors fed back (mean embedding, unigram-weighted mean, zero), which "
             "carry no information; `unigram`: the frequency prior, no network; `S*`: per seed, the number of "
             "averaged rollouts that matches soft feedback (`<1`: worse than one rollout; `>16`: better than "
             "sixteen). Soft feedback costs about one rollout, so `avg 2` is the comparison at about equal compute. "
             "Intervals: a two-way bootstrap over seeds and windows (every seed saw the same windows); with 3 seeds "
             "the seed-to-seed part is under-covered, so read a narrow win with care.", ""]
    for k in horizons:
        lines += nuance_section(table, raw, k)
    lines += representation_section(table, raw, horizons)
    lines += against_baseline_section(table, raw, horizons)
    lines += ["## The seed's claim, checked", "",
              "A config's own soft feedback (its `[soft]` kind, fixed before any result) must beat `sampled_avg_2` "
              "(two sampled rollouts averaged in probability: about the compute of one soft rollout plus one "
              "sample) and every constant vector fed back, at every horizon, each paired bootstrap interval over "
              "seeds and windows below 0, with teacher-forced val loss within 2% of the same dataset's "
              "cross-entropy baseline, or where the optimum is known, of the Bayes loss (the gate).", "",
              *claims(table, raw, horizons), ""]
    return lines


class SoftTokenStudy(Study):
    """The default study of language-model configs: soft-token definitions, embedding spaces and losses. With
    `--analogies` it is the analogy study, whose report is the analogies alone."""

    name = "soft tokens"

    def evaluate(self, run_dir: Path, cfg: Config, seed: int) -> dict:
        return evaluate_lm_run(run_dir, cfg, self.options, analogies=self.options.analogies)

    def stale(self, kept: dict, seed: int) -> bool:
        return self.options.analogies is not None and "analogies" not in kept

    def columns(self) -> list[str]:
        return columns(self.options.horizons)

    def bar_metrics(self) -> list[str]:
        return bar_metrics(self.options.horizons)

    def sections(self, results: Results) -> list[str]:
        if self.options.analogies is not None:
                return analogy_section(results.raw)
        return report_sections(results.table, results.raw, self.options.horizons)
