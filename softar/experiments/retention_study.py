"""The retention study (docs/context.md): `softar sweep ... --gap SHORT[:N] LONG[:N]` scores every run on the same
targets against the same references (`softar.evaluate.retention`), then pools the seeds' per-target arrays
(RUN/retention.npz) into paired intervals: the bootstrap resamples seeds and, shared across them, stretches."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from softar import SoftarError
from softar.config import Config
from softar.disk import open_regular
from softar.evaluate.context import RECOVERY_HISTORY
from softar.evaluate.retention import (
    ABLATIONS,
    COPY_DISTANCES,
    STRETCHES,
    bootstrap_gap_closed,
    gap_closed,
    split_context,
)
from softar.evaluate.stats import mean_std, paired_bootstrap_2way
from softar.experiments.study import (
    Results,
    Study,
    SweepOptions,
    analogy_section,
    evaluate_lm_run,
    save_figure,
)

ARRAYS_FILE = "retention.npz"
COLUMNS = ["loss", "retention.loss.real", "retention.gap", "retention.loss_minus_short", "retention.gap_closed",
           *[f"retention.ablation.{a}.diff" for a in ABLATIONS[1:]], "retention.cache.swapped.diff",
           *[f"retention.copy.{n}.diff" for n in COPY_DISTANCES],
           *[f"retention.bow_probe.{w}.recall_minus_prior" for w in ("history", "window")],
           *[f"recovery.{n}.{kind}.{m}" for n in (RECOVERY_HISTORY[0], RECOVERY_HISTORY[-1])
             for kind in ("segment", "aggregate") for m in ("recall_at_k", "prior_recall_at_k")]]
BAR_METRICS = ["retention.loss.real", "retention.loss_minus_short", "retention.ablation.swapped.diff"]

def setup(loaded: dict[str, Config], raw: dict[str, list[dict]], seed_phrase: str) -> str:
    """The report's setup paragraph, read off the configs and the runs' retention metrics (`seed_phrase`: which
    seeds ran, as `SweepOptions.seed_phrase` says it)."""
    cfg = next(iter(loaded.values()))
    m, t = cfg.model, cfg.train
    ret = next(iter(raw.values()))[0]["retention"]
    length = ret["window"] + ret["history"] + ret["targets"] // ret["stretches"]
    return (f"Every run: {m.n_layer} layers, d_model {m.d_model}, {m.pos_emb} positions, {t.max_iters} steps (the "
            "first config's; window, batch and steps as in each config's header), "
            f"{seed_phrase}. Every retention figure scores the same targets: the last "
            f"{ret['targets'] // ret['stretches']} tokens of {ret['stretches']} random val "
            f"stretches of {length} tokens, each target predicted from exactly its own context (a plain model: the N "
            "tokens before it; a layout model: its hard region's tokens just before it and its history before those "
            "in its summary slots), never from a cold-started window. Intervals are 95% paired bootstraps over seeds "
            "and, shared across them, stretches. Every metric of every config, mean and standard deviation over "
            "seeds: [results.csv]({assets}/results.csv).")


def parse_gap(gap: tuple[str, str], loaded: dict[str, Config]) -> list[tuple[str, int]]:
    """--gap's SHORT and LONG, each CONFIG or CONFIG:CONTEXT (a plain config's name) -> [(name, context)]."""
    refs = []
    for spec in gap:
        name, context = split_context(spec)
        if name not in loaded:
            raise SoftarError(f"sweep --gap: {name!r} is not one of the configs ({', '.join(loaded)})")
        cfg = loaded[name]
        if not cfg.context.plain:
            raise SoftarError(f"sweep --gap: {name!r} has a context layout; the references are plain configs")
        if context is not None and not 1 <= context <= cfg.model.block_size:
            raise SoftarError(f"sweep --gap: {spec}: the context must be in [1, {cfg.model.block_size}]")
        refs.append((name, context or cfg.model.block_size))
    return refs


def gap_specs(refs: list[tuple[str, int]], out: Path, seed: int) -> tuple[str, str]:
    """The `softar eval --gap` arguments of one seed."""
    return tuple(f"{out / 'runs' / f'{name}_s{seed}'}:{c}" for name, c in refs)


def scored_as(kept: dict, gap: tuple[str, str], windows: int) -> bool:
    """Whether a kept result's retention metrics were scored against these references on as many stretches."""
    ret = kept.get("retention")
    return isinstance(ret, dict) and ret.get("references") == list(gap) and ret.get("stretches") == min(windows,
                                                                                                        STRETCHES)


REQUIRED = ("short", "long", "real", "cached")


def load_arrays(dirs: list[Path]) -> dict[str, np.ndarray]:
    """Every seed's per-target arrays stacked: {name: [S, W, K]}; a damaged or foreign file is a one-line error."""
    per_seed = []
    for d in dirs:
        path = d / ARRAYS_FILE
        try:
            with open_regular(path, "retention arrays") as f, np.load(f, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except SoftarError:
            raise
        except Exception as e:  # a truncated zip, a bad CRC, a file that is no .npz at all
            raise SoftarError(f"{path}: not a readable retention file ({type(e).__name__})") from None
        shape = arrays.get("real", np.empty(0)).shape
        if any(k not in arrays for k in REQUIRED) or len(shape) != 2 or \
                any(a.shape != shape for a in arrays.values()):
            raise SoftarError(f"{path}: not a retention file (needs {', '.join(REQUIRED)} of one [stretches, "
                              "targets] shape)")
        per_seed.append(arrays)
    if len({p["real"].shape for p in per_seed}) > 1:
        raise SoftarError(f"{dirs[0].parent}: the seeds' retention files hold different numbers of targets")
    keys = set.intersection(*(set(p) for p in per_seed))
    return {k: np.stack([p[k] for p in per_seed]) for k in keys}


def _stretch_means(x: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """[S, W, K] -> [S, W] means over targets (over the masked ones; stretches with none are dropped)."""
    if mask is None:
        return x.mean(-1)
    keep = mask[0].any(-1)  # the mask is the data's: the same for every seed
    return ((x * mask).sum(-1) / np.maximum(mask.sum(-1), 1))[:, keep]


def _ci(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> dict[str, float]:
    return paired_bootstrap_2way(_stretch_means(a, mask), _stretch_means(b, mask))


def _fmt(ci: dict[str, float], scale: float = 1.0) -> str:
    return f"{ci['diff'] * scale:+.4f} [{ci['lo'] * scale:+.4f}, {ci['hi'] * scale:+.4f}]"


def _per_seed(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> str:
    """Each seed's mean difference: with few seeds the bootstrap's seed part under-covers, so they are shown too."""
    d = _stretch_means(a, mask) - _stretch_means(b, mask)
    return "per seed " + ", ".join(f"{x:+.4f}" for x in d.mean(1))


def _resolved(ci: dict[str, float]) -> str:
    return "better" if ci["lo"] > 0 else "worse" if ci["hi"] < 0 else "not resolved"


GATE_ACCURACY = 0.9  # binding: the full-attention reference must answer this many of the queries to count
CLOSES = {"bag": 0.5, "binding": 0.1}  # the predictions: sums close at least / at most this share of the gap


def _gap_closed_ci(arr: dict[str, np.ndarray], mask: np.ndarray | None = None,
                   base: np.ndarray | None = None) -> tuple[float, list[float]]:
    """`gap_closed` pooled over seeds, with its interval; `base` (a model's log p) in place of the short reference."""
    s, m, lg = (_stretch_means(arr[k], mask) for k in ("short", "real", "long"))
    b = None if base is None else _stretch_means(base, mask)
    return gap_closed(s, m, lg, b), bootstrap_gap_closed(s, m, lg, base=b)


def _ratio(f: float, ci: list[float]) -> str:
    return f"{f:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}]"


def known_answer_section(arrays: dict[str, dict[str, np.ndarray]], loaded: dict[str, Config],
                         refs: list[tuple[str, int]], prefix: int, base: str | None) -> list[str]:
    """Where the data's optimum is known (`softar.data.synthetic`): the gap the optimum itself has, the positive
    control (the full-attention reference must show it), each config's share of it, and the prediction's verdict.
    The share that counts is the one over `base`, the plain model trained on the short window: a layout's gain over
    it comes from its slots alone, while the short reference's other weights carry their own training."""
    first = next(iter(arrays.values()))
    (short, c_short), (long, c_long) = refs
    sums = [n for n, c in loaded.items() if not c.context.plain and c.context.memory == "arithmetic"
            and not c.context.soft and not c.context.project]  # trained from scratch or fine-tuned
    if "bayes_short" in first:
        kind, mask = "bag", None
        bayes = {k: -first[f"bayes_{k}"].mean() for k in ("short", "long", "history")}
        gap = _ci(first["long"], first["short"])
        control = gap["lo"] > 0
        lines = ["## Against the known optimum: bag of words", "",
                 "Each document's tokens are drawn from its own unigram distribution (a Dirichlet draw), so the counts "
                 "of the document's tokens so far are a sufficient statistic and the optimum is exact "
                 "(`softar.data.synthetic.Bag`). On these very targets it loses "
                 f"{bayes['short']:.4f} nats read from {c_short} tokens, {bayes['long']:.4f} from {c_long} and "
                 f"{bayes['history']:.4f} from all {prefix} tokens before them (what a layout reads): the gap a "
                 f"memory can close is {bayes['short'] - bayes['history']:.4f} nats, "
                 f"{bayes['short'] - bayes['long']:.4f} of it within {c_long} tokens.", "",
                 f"**Positive control**: {long} at {c_long} against {short} at {c_short} tokens, same weights: "
                 f"{_fmt(gap)} nats, {gap['diff'] / (bayes['short'] - bayes['long']):.0%} of the optimum's gap "
                 f"over the same contexts: " + ("the apparatus sees the gap." if control else
                                                "**not resolved: below the floor, no conclusion is drawn below.**"),
                 ""]
        head = "| config | loss | excess | vs short |"
    elif "query_mask" in first:
        kind, mask = "binding", first["query_mask"].astype(bool)
        acc_long, acc_short = float(first["hit_long"][mask].mean()), float(first["hit_short"][mask].mean())
        control = acc_long >= GATE_ACCURACY
        bag_share = 1 - first["query_bag_loss"][mask].mean() / first["query_window_loss"][mask].mean()
        sight = first["query_in_sight"].astype(bool)
        lines = ["## Against the known optimum: binding", "",
                 f"The scored targets that are a query's value whose fact lies outside the {c_short} tokens before it: "
                 f"{int(mask[0].sum())} per seed. A reader of the whole document knows each exactly (accuracy 1, "
                 f"loss 0); a reader of those {c_short} tokens alone knows nothing of it (values are independent of "
                 "everything else): accuracy "
                 f"{np.exp(-first['query_window_loss'][mask]).mean():.3f}, loss "
                 f"{first['query_window_loss'][mask].mean():.4f}. A sum of the facts' embeddings holds every key and "
                 "every value, whatever the pairing (`softar.data.synthetic.Binding`). It can still tell something: "
                 "a reader that also knows the document's values as a bag (which nodes, how often, not whose) at best "
                 "reaches loss "
                 f"{first['query_bag_loss'][mask].mean():.4f} (accuracy "
                 f"{first['query_bag_accuracy'][mask].mean():.3f}), "
                 f"{bag_share:.3f} of the optimum's gap (below), without "
                 "knowing whose value is whose: a share above 0.1 can come from the bag alone. It is a reference, "
                 "not a bound: segment sums also tell which facts shared a segment.", "",
                 f"**Positive control**: {long}, reading {c_long} tokens (whole documents), answers {acc_long:.3f} of "
                 f"these queries (the gate: >= {GATE_ACCURACY}); {short} at {c_short} tokens {acc_short:.3f}. " +
                 ("The apparatus sees the gap." if control else
                  "**Below the floor**: the full-attention model has not learned the lookup at this budget, so "
                  "nothing below says whether summaries can or cannot bind."), "",
                 *(["The sections after this one score every token, most of which these models never trained on "
                    "(data.targets = \"queries\"): only this section measures them.", ""]
                   if any(c.data.targets == "queries" for c in loaded.values()) else []),
                 f"**Each model's own control**: `in sight` is its accuracy on the {int(sight[0].sum())} queries per "
                 f"seed whose whole fact lies within the {c_short} tokens before them, which a config with at least "
                 f"{c_short} hard tokens reads in plain tokens: one below the gate there has not learned the lookup, "
                 "and what it does with its summaries says little about them.", "",
                 "On these queries alone:", ""]
        head = "| config | accuracy | in sight | loss | vs short |"
    else:
        return []
    legend = ("`vs short`: log p gained over the short reference, nats per target. `gap closed`: (L_short - "
              "L_config) / (L_short - L_long)")
    if base:
        legend += f"; `closed over {base}`: (L_{base} - L_config) / (L_short - L_long), the gain of the slots alone"
    legend += ", pooled over seeds, 95% bootstrap intervals."
    if kind == "bag":
        legend += (" `excess`: the config's loss minus the optimum's from the same tokens (plain: its context; a "
                   "layout: its hard tokens and history).")
        if base:
            legend += (f" `of the optimum's gap`: (L_{base} - L_config) / (the optimum's loss from {c_short} tokens "
                       f"minus its loss from {prefix}): the share of what the history can give at all, with no "
                       "trained model in the denominator; the prediction is judged on it.")
    else:
        legend += (f" `of the optimum's gap`: (L_opt - L_config) / L_opt, L_opt the optimum of a reader of the "
                   f"{c_short} tokens alone (a reader of the whole document has loss 0): what the config knows of "
                   "the values beyond that reader, with no trained model in the reference (the same-weights short "
                   f"reference is not a calibrated reader of {c_short} tokens, so a share over it can come from "
                   "calibration "
                   "alone); the prediction is judged on it.")
    optimum_column = kind == "binding" or bool(base)
    lines += [legend, "",
              head + " gap closed |" + (f" closed over {base} |" if base else "")
              + (" of the optimum's gap |" if optimum_column else ""),
              "|---" * (head.count("|") + (1 if base else 0) + (1 if optimum_column else 0)) + "|"]
    shares = {}
    for name, arr in arrays.items():
        cfg = loaded[name]
        real = arr["real"] if mask is None else arr["real"][mask]
        if kind == "bag":
            c = cfg.context
            reads = cfg.model.block_size - c.aggregate - c.segments - c.soft + c.max_history  # a layout's tokens
            same = {c_short: "short", c_long: "long"}.get(cfg.model.block_size) if c.plain else \
                "history" if reads == prefix else None
            cells = [f"{-real.mean():.4f}", f"{-real.mean() - bayes[same]:+.4f}" if same else ""]
        else:
            cells = [f"{arr['hit_real'][mask].mean():.3f}", f"{arr['hit_real'][sight].mean():.3f}",
                     f"{-real.mean():.4f}"]
        cells.append(_fmt(_ci(arr["real"], arr["short"], mask)))
        cells.append(_ratio(*_gap_closed_ci(arr, mask)) if control else "(below the floor)")
        if base:
            shares[name] = _gap_closed_ci(arr, mask, arrays[base]["real"])
            cells.append(_ratio(*shares[name]) if control else "")
        if optimum_column:  # the gain over the optimum's own gap: no trained model in the denominator
            if kind == "bag":
                optimum = {"short": first["bayes_short"], "real": arr["real"], "long": first["bayes_history"]}
                shares[name] = _gap_closed_ci(optimum, None, arrays[base]["real"])
            else:
                optimum = {"short": -first["query_window_loss"], "real": arr["real"], "long": np.zeros(mask.shape)}
                shares[name] = _gap_closed_ci(optimum, mask)
            cells.append(_ratio(*shares[name]) if control else "")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if control and sums and optimum_column:
        bound = CLOSES[kind]
        reference = f"over {base}" if kind == "bag" else f"below a reader of {c_short} tokens"
        lines += ["", f"**The prediction** ({kind}): pure sums close {'at least' if kind == 'bag' else 'at most'} "
                  f"{bound} of the optimum's gap {reference}."]
        for name in sums:
            f, (lo, hi) = shares[name]
            holds = (lo >= bound) if kind == "bag" else (hi <= bound)
            fails = (hi < bound) if kind == "bag" else (lo > bound)
            verdict = "holds" if holds else "fails" if fails else "not resolved (the interval straddles it)"
            if kind == "binding":  # the bag of values informs without any binding: a share above 0.1 may come from it
                verdict += (f"; {'above' if lo > bag_share else 'below' if hi < bag_share else 'not resolved against'}"
                            f" the bag-of-values optimum ({bag_share:.3f})")
                in_sight = float(arrays[name]["hit_real"][sight].mean())
                if in_sight < GATE_ACCURACY:  # it cannot look up a fact it reads: its summaries are not on trial
                    verdict = (f"**below the floor**: it answers {in_sight:.3f} of the queries in sight (the gate: "
                               f">= {GATE_ACCURACY}), so this says nothing of what sums can bind ({verdict})")
            lines.append(f"- {name} ({loaded[name].context.op}): {_ratio(f, [lo, hi])}: {verdict}.")
    return lines + [""]


def report_sections(table: dict, raw: dict[str, list[dict]], loaded: dict[str, Config],
                    dirs: dict[str, list[Path]], refs: list[tuple[str, int]]) -> list[str]:
    arrays = {name: load_arrays(ds) for name, ds in dirs.items()}
    (short, c_short), (long, c_long) = refs
    first = next(iter(arrays.values()))
    for name, arr in arrays.items():  # every config scored on the same targets against the same references
        if arr["short"].shape != first["short"].shape or not np.array_equal(arr["short"], first["short"]) \
                or not np.array_equal(arr["cached"], first["cached"]):
            raise SoftarError(f"sweep: {name}'s retention targets differ from {next(iter(arrays))}'s (a config that "
                              "reads more than 544 tokens before a target draws other stretches)")
    S, W, K = first["short"].shape
    cached = first["cached"].astype(bool)
    plain = [n for n, c in loaded.items() if c.context.plain and not c.train.init_from]
    base = next((n for n in plain if loaded[n].model.block_size == c_short and n != short), None)
    gap_ci = _ci(first["long"], first["short"])  # log p long - short = L_short - L_long: the gap in nats
    vs_base = f". `vs {base}`: log p gained over {base}, the plain model trained on {c_short}-token windows" \
        if base else ""
    lines = ["## The gap, on identical targets", "",
             f"The references: {short} with exactly {c_short} tokens of context (short) and {long} with {c_long} "
             f"(long){' (the same weights)' if short == long else ''}. `vs short`: log p gained over the short "
             "reference, nats per target (positive: better). `gap closed`: (L_short - L_config) / (L_short - "
             f"L_long){vs_base}.",
             "",
             f"**The gap**: L_short - L_long = {_fmt(gap_ci)} nats ({S} seeds x {W} stretches x {K} targets).",
             ""]
    if gap_ci["lo"] <= 0:
        lines += ["**There is no resolved gap at this budget**: the long context does not lower the loss of these "
                  "targets beyond the interval's noise, so every `gap closed` below is a ratio over a denominator "
                  "indistinguishable from 0 and means nothing. Read `vs short` and the paired comparisons instead.", ""]
    head = ["config", "loss", "vs short", "gap closed"] + ([f"vs {base}"] if base else [])
    lines += ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for name, arr in arrays.items():
        f, (lo, hi) = _gap_closed_ci(arr)
        cells = [name, f"{-arr['real'].mean():.4f}", _fmt(_ci(arr["real"], arr["short"])),
                 f"{f:+.3f} [{lo:+.3f}, {hi:+.3f}]" if gap_ci["lo"] > 0 else "(no gap)"]
        if base:
            cells.append(_fmt(_ci(arr["real"], arrays[base]["real"])))
        lines.append("| " + " | ".join(cells) + " |")
    history = next(iter(raw.values()))[0]["retention"]["history"]
    lines += ["", f"### Targets only the history holds ({cached.mean():.1%} of them)", "",
              f"Targets whose token occurs in the {history} tokens before the short "
              f"context but not inside its {c_short}: only a model that remembers can know them. Same columns, on "
              "these targets alone.", "", "| " + " | ".join(head[:3] + head[4:]) + " |",
              "|---" * (len(head) - 1) + "|"]
    for name, arr in arrays.items():
        cells = [name, f"{-(arr['real'][cached]).mean():.4f}", _fmt(_ci(arr["real"], arr["short"], first["cached"]))]
        if base:
            cells.append(_fmt(_ci(arr["real"], arrays[base]["real"], first["cached"])))
        lines.append("| " + " | ".join(cells) + " |")
    layout = [n for n, arr in arrays.items() if "swapped" in arr]
    if layout:
        lines += ["", "## Ablations of the same weights", "",
                  "log p of the real summaries minus an ablation's, nats per target (positive: the real summaries "
                  "help). swapped: another stretch's history; zeroed: zero vectors in the summary slots; shuffled: "
                  "the history's order shuffled inside each slot's span (for pure sums exactly 0: a check of the "
                  "scoring). `cache`: the same as swapped, on the targets only the history holds.", "",
                  "| config | swapped | zeroed | shuffled | cache (swapped) |", "|---|---|---|---|---|"]
        for name in layout:
            arr = arrays[name]
            cells = [_fmt(_ci(arr["real"], arr[a])) for a in ABLATIONS[1:]]
            cells.append(_fmt(_ci(arr["real"], arr["swapped"], first["cached"])))
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "## Copy probe", "",
              "The span of targets planted N tokens before them, against another stretch's span planted there: "
              "log p gained per target (all but the first), mean ± std over seeds. A model that copies gains inside "
              "what it can see; outside everything it sees the gain is exactly 0. At N = 32 the planted span is the "
              "32 tokens just before the targets, so each target follows a repetition of itself.", "",
              "| config | " + " | ".join(f"N = {n}" for n in COPY_DISTANCES) + " |",
              "|---" * (len(COPY_DISTANCES) + 1) + "|"]
    for name, cols in table.items():
        cells = [f"{cols[c][0]:+.4f} ± {cols[c][1]:.4f}" if c in cols else ""
                 for c in (f"retention.copy.{n}.diff" for n in COPY_DISTANCES)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "## Bag-of-words probe", "",
              "A logistic map from the last hidden state before a target to the tokens a span held, fitted on train "
              "stretches and scored on val by recall@k against the frequency prior's (mean ± std over seeds). "
              f"`history`: the {history} tokens before the short context, which only a memory can supply; `window`: "
              f"the {c_short} tokens of the short context itself, the probe's own check (a model must know those).",
              "", "| config | history: recall - prior | window: recall - prior |", "|---|---|---|"]
    for name, cols in table.items():
        cells = [f"{cols[c][0]:+.4f} ± {cols[c][1]:.4f}" if c in cols else ""
                 for c in (f"retention.bow_probe.{w}.recall_minus_prior" for w in ("history", "window"))]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    rec = [n for n in table if f"recovery.{RECOVERY_HISTORY[-1]}.aggregate.recall_at_k" in table[n]]
    if rec:
        lines += ["", "## Recovery against the frequency prior", "",
                  "Rank the vocabulary by cosine to a summary slot (embedding arithmetic alone) and count how many of "
                  "the k distinct tokens it holds are in the top k; the prior ranks by train-split frequency without "
                  "looking at the history. Mean ± std over seeds; N: tokens of history.", "",
                  "| config | slot | N | recall@k | prior | recall - prior |", "|---|---|---|---|---|---|"]
        for name in rec:
            for n in (RECOVERY_HISTORY[0], RECOVERY_HISTORY[-1]):
                for kind in ("segment", "aggregate"):
                    runs = [r["recovery"][str(n)][kind] for r in raw[name] if kind in r["recovery"].get(str(n), {})]
                    if not runs:
                        continue
                    cells = [mean_std([r[k] for r in runs]) for k in ("recall_at_k", "prior_recall_at_k",
                                                                      "recall_minus_prior")]
                    lines.append(f"| {name} | {kind} | {n} | " + " | ".join(f"{m:+.3f} ± {s:.3f}" for m, s in cells)
                                 + " |")
    tuned = {}
    for name, cfg in loaded.items():
        if cfg.train.init_from:
            tuned.setdefault(cfg.train.init_from, []).append(name)
    for init, names in tuned.items():
        control = next((n for n in names if loaded[n].context.plain), None)
        if control is None:
            continue
        lines += ["", "## Pre-trained on hard tokens, then fine-tuned", "",
                  f"Every config below starts from `{init}` and trains {loaded[control].train.max_iters} more steps; "
                  f"{control} keeps the plain window. log p gained over {control}, nats per target (all targets; "
                  "targets only the history holds).", "", f"| config | loss | vs {control} | on history-only targets |",
                  "|---|---|---|---|"]
        for name in names:
            arr = arrays[name]
            lines.append(f"| {name} | {-arr['real'].mean():.4f} | {_fmt(_ci(arr['real'], arrays[control]['real']))} "
                         f"| {_fmt(_ci(arr['real'], arrays[control]['real'], first['cached']))} |")
    ret = next(iter(raw.values()))[0]["retention"]
    known = known_answer_section(arrays, loaded, refs, ret["window"] + ret["history"], base)
    return known + summary(arrays, loaded, raw, refs, base, gap_ci) + lines + [""]


def summary(arrays: dict, loaded: dict[str, Config], raw: dict[str, list[dict]], refs: list[tuple[str, int]],
            base: str | None, gap_ci: dict[str, float]) -> list[str]:
    """The findings, each a paired interval from the tables below: the gap; every layout config against the plain
    short window; every control against pure arithmetic; the ablations; the fine-tuning."""
    (short, c_short), (long, c_long) = refs
    cached = next(iter(arrays.values()))["cached"]
    out = ["## Summary", "",
           "Intervals: 95% paired bootstrap over seeds and stretches, nats of log p per target (positive: the first "
           "named is better), with each seed's own difference beside it: with this few seeds the bootstrap's seed part "
           "under-covers, and these are many comparisons, uncorrected, so a verdict near its interval's edge is weak. "
           "`gap closed` compares a layout with the reference's *other* weights, so training differences count in it; "
           "the comparison against the plain model trained on the short window is the clean one.", "",
           f"- The same-weights gap ({short} at {c_short} against {long} at {c_long} tokens) is {_fmt(gap_ci)}: "
           + ("resolved." if gap_ci["lo"] > 0 else "**not resolved: at this budget a longer context does not help, "
              "so there is no gap for summary slots to close**.")]
    layouts = [n for n, c in loaded.items() if not c.context.plain and not c.train.init_from]
    arithmetic = next((n for n in layouts if loaded[n].context.memory == "arithmetic" and not
                       loaded[n].context.project), None)
    if base:
        for name in layouts:
            ci = _ci(arrays[name]["real"], arrays[base]["real"])
            hist = _ci(arrays[name]["real"], arrays[base]["real"], cached)
            out.append(f"- {name} against {base}: {_fmt(ci)} ({_resolved(ci)}; "
                       f"{_per_seed(arrays[name]['real'], arrays[base]['real'])}); on the targets only the history "
                       f"holds {_fmt(hist)} ({_resolved(hist)}).")
    if arithmetic:
        for name in layouts:
            if name != arithmetic:
                ci = _ci(arrays[arithmetic]["real"], arrays[name]["real"])
                c = loaded[name].context
                if c.memory == "arithmetic" and not c.project and not c.soft:  # another op, not a control
                    what = f"{name} (op {c.op})"
                    verdict = (f"{loaded[arithmetic].context.op} is better" if ci["lo"] > 0 else f"{c.op} is better"
                               if ci["hi"] < 0 else "not resolved")
                else:
                    what = f"the control {name}" if c.memory != "arithmetic" or c.project else name
                    verdict = ("pure arithmetic beats it" if ci["lo"] > 0 else "it beats pure arithmetic"
                               if ci["hi"] < 0 else "pure arithmetic does not beat it (the interval holds 0)")
                out.append(f"- {arithmetic} against {what}: {_fmt(ci)} "
                           f"({_per_seed(arrays[arithmetic]['real'], arrays[name]['real'])}): {verdict}.")
        by_memory = {loaded[n].context.memory: n for n in layouts}
        if "write" in by_memory and "rmt" in by_memory:  # retroactive enrichment against the learned memory
            ci = _ci(arrays[by_memory["write"]]["real"], arrays[by_memory["rmt"]]["real"])
            out.append(f"- {by_memory['write']} (write vectors) against {by_memory['rmt']} (RMT memory): {_fmt(ci)} "
                       f"({_resolved(ci)}).")
        arr = arrays[arithmetic]
        ci = _ci(arr["real"], arr["swapped"])
        out.append(f"- {arithmetic}'s real summaries against another stretch's: {_fmt(ci)} ({_resolved(ci)}; "
                   f"{_per_seed(arr['real'], arr['swapped'])}): "
                   + (f"the model reads what its summaries hold, by {ci['diff']:.4f} nats per target." if ci["lo"] > 0
                      else "the model does not use what its summaries hold beyond what any history's would give."))
    for name, cfg in loaded.items():
        if cfg.train.init_from and not cfg.context.plain:
            control = next((n for n, c in loaded.items() if c.train.init_from == cfg.train.init_from
                            and c.context.plain), None)
            if control:
                ci = _ci(arrays[name]["real"], arrays[control]["real"])
                out.append(f"- Fine-tuned with slots ({name}) against fine-tuned without ({control}), same start and "
                           f"steps: {_fmt(ci)} ({_resolved(ci)}; "
                           f"{_per_seed(arrays[name]['real'], arrays[control]['real'])}).")
    return out + [""]


def plot_context_curve(raw: dict[str, list[dict]], arrays_dirs: dict[str, list[Path]], refs: list[tuple[str, int]],
                       out: Path) -> None:
    """context_curve.png: the long reference's loss on the retention targets against its context, and each other
    config's loss as a level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    long = refs[1][0]
    curves = [r["retention"]["context_curve"] for r in raw[long]]
    xs = sorted(int(c) for c in curves[0])
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ys = np.array([[c[str(x)] for x in xs] for c in curves])
    ax.errorbar(xs, ys.mean(0), yerr=ys.std(0), marker="o", color="black", label=f"{long} at context N")
    for i, name in enumerate(n for n in raw if n != long):
        level = float(np.mean([r["retention"]["loss"]["real"] for r in raw[name]]))
        ax.axhline(level, color=f"C{i}", linestyle="--", linewidth=1, label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens of context (plain reference)")
    ax.set_ylabel("loss on the retention targets (nats)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, out / "context_curve.png", dpi=110)


class RetentionStudy(Study):
    """`softar sweep ... --gap SHORT[:N] LONG[:N]`: every run scored on identical targets against the two plain
    references (trained first), the seeds' per-target arrays pooled into paired intervals; `--analogies` adds the
    analogy section, `--generation` the layout study's coherence trade-off."""

    name = "retention"

    def __init__(self, configs: dict[str, Config], options: SweepOptions):
        from softar.experiments.context_study import LayoutStudy

        super().__init__(configs, options)
        self.layouts = LayoutStudy(configs, options) if options.generation else None

    def check(self) -> None:
        self.refs = parse_gap(self.options.gap, self.configs)
        if self.layouts:
            self.layouts.check()

    def first(self) -> list[str]:
        return list(dict.fromkeys(name for name, _ in self.refs))

    def gap(self, seed: int) -> tuple[str, str]:
        return gap_specs(self.refs, self.options.out, self.options.base_seed + seed)

    def evaluate(self, run_dir: Path, cfg: Config, seed: int) -> dict:
        # the retention study reads neither a plain run's soft-output metrics nor a new pass over the whole split
        # (the run's own final one stands)
        return evaluate_lm_run(run_dir, cfg, self.options, gap_runs=self.gap(seed), arrays_out=run_dir / ARRAYS_FILE,
                               analogies=self.options.analogies, soft_metrics=False, whole_split=False)

    def stale(self, kept: dict, seed: int) -> bool:
        return not scored_as(kept, self.gap(seed), self.options.windows) or \
            self.options.analogies is not None and "analogies" not in kept

    def columns(self) -> list[str]:
        return list(COLUMNS)

    def bar_metrics(self) -> list[str]:
        return BAR_METRICS

    def plots(self, results: Results) -> list[str]:
        plot_context_curve(results.raw, results.dirs, self.refs, self.options.out)
        pngs = ["context_curve.png", *super().plots(results)]
        return pngs + ([self.layouts.plot_tradeoff()] if self.layouts else [])

    def setup(self, results: Results) -> str:
        return setup(results.configs, results.raw, self.options.seed_phrase())

    def sections(self, results: Results) -> list[str]:
        lines = report_sections(results.table, results.raw, results.configs, results.dirs, self.refs)
        if self.layouts:
            lines += self.layouts.sections(results)
        return lines + (analogy_section(results.raw) if self.options.analogies is not None else [])
