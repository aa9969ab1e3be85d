"""Retention: what the summary slots remember, scored on identical targets (docs/context.md).

Every score here is a log-probability of the same targets: the last `TARGETS` tokens of random val stretches, each
predicted from *exactly* its own context, never from a cold-started window.

- A plain model at context c sees the c tokens before each target.
- A layout model sees the `hard` tokens before each target in its hard region, and the `history` tokens before
  those in its summary slots (the soft region, which would follow, cannot change a causal model's last hard slot).

On these targets:
- **the gap**: the loss of a short reference (say 32 tokens) minus a long one (128), and the fraction of it a model
  closes, with a bootstrap interval over stretches;
- **ablations** of the same weights: real summaries, summaries of another stretch's history (swapped), zero vectors
  (zeroed), and the history shuffled inside each slot's span (shuffled: for sums exactly the real summaries, a
  check of the scoring itself);
- **the cache probe**: the gain in log p of the targets whose token sits in the history but not in the hard window
  (only the summaries hold it), real against swapped summaries;
- **the copy probe**: the gain in log p of the targets when the same span of text is planted N tokens before them;
- **the context curve**: a plain model's loss at contexts 1, 2, 4, ... on the same targets;
- **the bag-of-words probe**: can a linear map read which tokens the history held from the last hidden state?
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from softar.data.dataset import random_windows
from softar.data.synthetic import HMM, Bag, Binding, Language
from softar.evaluate.stats import paired_bootstrap
from softar.soft.model import SoftAR

TARGETS = 32  # scored tokens per stretch
STRETCHES = 128  # at most this many val stretches (x TARGETS targets) per evaluation
PREFIX = 544  # tokens before the first target (32 hard + 512 history): stretches drawn alike for every model
ABLATIONS = ("real", "swapped", "zeroed", "shuffled")
CONTEXTS = (1, 2, 4, 8, 16, 32, 64, 128)
COPY_DISTANCES = (32, 96, 256, 512)
COPY_STRETCHES = 32  # the copy probe reads the first 32 stretches (2 passes per distance: the costliest figure)
SCORE_BATCH = 256  # targets per forward pass

# (ids [N, L], prefix P) -> log p of ids[:, P:] [N, L - P], each target from its own context
Scorer = Callable[[torch.Tensor, int], torch.Tensor]


def prefix_needed(model: SoftAR, context: int | None = None) -> int:
    """Tokens before the first target that a model reads: its context (plain) or hard region + history."""
    lay = model.layout
    return (model.window_slots if context is None else context) if lay.plain else lay.hard + lay.history


def split_context(spec: str) -> tuple[str, int | None]:
    """NAME or NAME:CONTEXT (ASCII digits) -> (name, context or None)."""
    name, _, tail = spec.rpartition(":")
    return (name, int(tail)) if name and tail.isascii() and tail.isdecimal() else (spec, None)


def stretches(data: np.ndarray, prefix: int, count: int, seed: int, device: torch.device | str) -> torch.Tensor:
    """`count` random val stretches [count, prefix + TARGETS]: the scored targets are the last TARGETS tokens."""
    return random_windows(data, prefix + TARGETS, count, seed, device)


def shuffle_within_slots(hist: torch.Tensor, model: SoftAR, seed: int = 0) -> torch.Tensor:
    """hist [..., H] (the newest last) with its tokens permuted inside each summary slot's span of ages: a sum over
    each span is unchanged."""
    H = hist.shape[-1]
    gen = torch.Generator().manual_seed(seed)
    order = torch.arange(H)
    ranges = model.layout.slot_ranges()
    if model.layout.aggregate_all:  # the aggregate spans the segments too: shuffle it only where they are not
        ranges = [(model.layout.span, float("inf"))] + ranges[1:]
    for lo, hi in ranges:  # ages [lo, hi) are columns [H - hi, H - lo)
        a, b = max(0, H - int(min(hi, H))), H - lo
        if b - a > 1:
            order[a:b] = a + torch.randperm(b - a, generator=gen)
    return hist[..., order.to(hist.device)]


def scored_windows(model: SoftAR, ids: torch.Tensor, prefix: int, context: int | None = None,
                   ablation: str = "real"):
    """The window that predicts each target ids[:, prefix:], row (n, k) for target k of stretch n, in batches of
    SCORE_BATCH rows -> yields (row slice, window [R, T, m]). `context` sets a plain model's (default: its window);
    `ablation` (a layout model) what its summary slots hold."""
    if ablation not in ABLATIONS:
        raise ValueError(f"ablation must be one of {', '.join(ABLATIONS)}, got {ablation!r}")
    lay = model.layout
    N, L = ids.shape
    K = L - prefix
    if context is None:
        context = model.window_slots
    need = prefix_needed(model, context)
    if prefix < need:
        raise ValueError(f"prefix {prefix} is shorter than the {need} tokens this model reads before a target")
    if lay.plain and not 1 <= context <= model.window_slots:
        raise ValueError(f"context must be in [1, {model.window_slots}], got {context}")
    t = torch.arange(prefix, L, device=ids.device)  # [K] target positions
    n_tok = context if lay.plain else lay.hard
    x = ids[:, t[:, None] - n_tok + torch.arange(n_tok, device=ids.device)].reshape(N * K, n_tok)
    hist = None
    if not lay.plain:
        H = lay.history
        hist = ids[:, t[:, None] - n_tok - H + torch.arange(H, device=ids.device)]  # [N, K, H]
        if ablation == "swapped":  # another stretch's history, at the same offset
            hist = hist.roll(1, dims=0)
        elif ablation == "shuffled":
            hist = shuffle_within_slots(hist, model)
        hist = hist.reshape(N * K, H)
    for s in range(0, N * K, SCORE_BATCH):
        rows = slice(s, s + SCORE_BATCH)
        tokens = model.E[x[rows]]
        if lay.plain:
            yield rows, model.window(tokens)
        elif ablation == "zeroed":
            yield rows, model.slots(tokens.new_zeros(tokens.shape[0], lay.n_summary, tokens.shape[2]), tokens, 0)
        else:
            h = hist[rows]
            yield rows, model.window(tokens, (h, torch.full((h.shape[0],), h.shape[1], device=h.device)))


@torch.no_grad()
def target_scores(model: SoftAR, ids: torch.Tensor, prefix: int, context: int | None = None,
                  ablation: str = "real") -> tuple[torch.Tensor, torch.Tensor]:
    """log p of every target ids[:, prefix:] from exactly its own context (`scored_windows`) [N, K] float64, and
    whether the target is the model's most likely token there [N, K] bool."""
    model.eval()
    target = ids[:, prefix:].reshape(-1)
    logps = torch.empty(target.shape[0], dtype=torch.float64)
    hits = torch.empty(target.shape[0], dtype=torch.bool)
    for rows, window in scored_windows(model, ids, prefix, context, ablation):
        logp = model.read(window, last=True).logits[:, -1].float().log_softmax(-1)
        logps[rows] = logp.gather(1, target[rows, None])[:, 0].double().cpu()
        hits[rows] = (logp.argmax(-1) == target[rows]).cpu()
    return logps.view(ids.shape[0], -1), hits.view(ids.shape[0], -1)


def target_logprobs(model: SoftAR, ids: torch.Tensor, prefix: int, context: int | None = None,
                    ablation: str = "real") -> torch.Tensor:
    """log p of every target ids[:, prefix:] from exactly its own context -> [N, K] float64 (`target_scores`)."""
    return target_scores(model, ids, prefix, context, ablation)[0]


def held_only_in_history(ids: torch.Tensor, prefix: int, window: int, history: int) -> torch.Tensor:
    """[N, K] bool: the target's token occurs among the `history` tokens before its `window`-token context but not
    inside that context (only something that remembers the history can know it)."""
    N, L = ids.shape
    out = torch.zeros(N, L - prefix, dtype=torch.bool)
    for k, t in enumerate(range(prefix, L)):
        tok = ids[:, t : t + 1]
        in_window = (ids[:, t - window : t] == tok).any(1)
        in_history = (ids[:, max(0, t - window - history) : t - window] == tok).any(1)
        out[:, k] = (in_history & ~in_window).cpu()
    return out


def copy_scores(scorer: Scorer, ids: torch.Tensor, prefix: int, distances: tuple[int, ...] = COPY_DISTANCES
                ) -> dict[str, torch.Tensor]:
    """The copy probe's raw material: for each distance N, the log p of the targets (all but the first, which no
    copy predicts) when the span of targets is planted N tokens before them, minus their log p when another
    stretch's span of the same length is planted there instead (so that overwriting the text there costs both
    alike) -> {str(N): gains [N, K - 1]}."""
    K = ids.shape[1] - prefix
    result = {}
    for n in distances:
        if not K <= n <= prefix:
            raise ValueError(f"copy distance {n} must be in [{K}, {prefix}] (the span may not overlap its copy)")
        planted, other = ids.clone(), ids.clone()
        planted[:, prefix - n : prefix - n + K] = ids[:, prefix:]
        other[:, prefix - n : prefix - n + K] = ids[:, prefix:].roll(1, dims=0)
        result[str(n)] = scorer(planted, prefix)[:, 1:] - scorer(other, prefix)[:, 1:]
    return result


def gap_closed(short: np.ndarray, model: np.ndarray, long: np.ndarray, base: np.ndarray | None = None) -> float:
    """(L_short - L_model) / (L_short - L_long) from per-target log p's: 0 = nothing closed, 1 = as good as long.
    `base` counts the model's gain over another model instead (L_base - L_model), still as a share of the gap."""
    base = short if base is None else base
    return float((model.mean() - base.mean()) / (long.mean() - short.mean()))


def bootstrap_gap_closed(short: np.ndarray, model: np.ndarray, long: np.ndarray, n_boot: int = 2000, seed: int = 0,
                         level: float = 0.95, base: np.ndarray | None = None) -> list[float]:
    """A percentile interval for `gap_closed` over log p arrays [S, W] (seeds x stretches, every seed on the same
    stretches; a 1-d array is one seed): the bootstrap resamples seeds and, shared across them, stretches."""
    arrs = [np.atleast_2d(np.asarray(a, dtype=np.float64)) for a in (short, model, long,
                                                                     short if base is None else base)]
    arrs = [a.reshape(a.shape[0], a.shape[1], -1).mean(-1) for a in arrs]  # per-stretch means
    if len({a.shape for a in arrs}) > 1:
        raise ValueError("bootstrap_gap_closed needs equal-shape [seeds, stretches] arrays")
    rng = np.random.default_rng(seed)
    S, W = arrs[0].shape
    values = np.empty(n_boot)
    for i in range(n_boot):
        s, w = rng.integers(0, S, S), rng.integers(0, W, W)
        a, m, b, c = (x[s][:, w].mean() for x in arrs)
        values[i] = (m - c) / (b - a) if b != a else np.nan
    tail = (1 - level) / 2 * 100
    lo, hi = np.nanpercentile(values, [tail, 100 - tail])
    return [float(lo), float(hi)]


def diff_ci(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, float]:
    """Mean of a - b (nats of log p: positive = a better) over targets, with a bootstrap interval over stretches;
    `mask` [N, K] keeps some targets (stretches with none drop out)."""
    if mask is None:
        mask = torch.ones_like(a, dtype=torch.bool)
    keep = mask.any(1)
    d = ((a - b) * mask).sum(1)[keep] / mask.sum(1)[keep]
    if not keep.any():
        return {"diff": float("nan"), "lo": float("nan"), "hi": float("nan"), "targets": 0}
    return {**paired_bootstrap(d.numpy(), np.zeros(int(keep.sum()))), "targets": int(mask.sum())}


def bayes_logprobs(lang: HMM | Bag, ids: torch.Tensor, prefix: int, context: int, rows: int = 256) -> torch.Tensor:
    """The exact optimum's log p of every target ids[:, prefix:] read from exactly the `context` tokens before it
    (as a plain model of that context reads it) -> [N, K] float64."""
    N, L = ids.shape
    t = torch.arange(prefix, L, device=ids.device)
    windows = ids[:, t[:, None] - context + torch.arange(context + 1, device=ids.device)].reshape(-1, context + 1)
    return torch.cat([lang.teacher_forced(windows[s : s + rows])[:, -1].cpu()
                      for s in range(0, len(windows), rows)]).view(N, L - prefix)


def known_answer(lang: Language, ids: torch.Tensor, prefix: int, contexts: tuple[int, int],
                 logps: dict[str, torch.Tensor], hits: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """Where the data's optimum is known (`softar.data.synthetic`), the retention targets against it -> (metrics,
    per-target arrays). Exact languages: the optimum's loss from the short context, the long one and the whole
    stretch before each target (`bayes`). Binding: the queries whose fact lies outside the short context, each
    model's accuracy and loss there beside the optimum of a reader of the short context and of one that also knows
    the document's values as a bag, and each model's accuracy on the queries whose fact the short context holds
    (`queries`)."""
    if isinstance(lang, Binding):
        q = lang.query_targets(ids, prefix, contexts[0])
        m = q["mask"]
        if not m.any():
            return {"queries": {"targets": 0}}, {"query_mask": m.numpy()}
        metrics = {"targets": int(m.sum()), "accuracy": {k: hits[k][m].float().mean().item() for k in hits},
                   "loss": {k: -logps[k][m].mean().item() for k in logps},
                   "window_optimum": {"loss": q["window_loss"][m].mean().item(),
                                      "accuracy": q["window_accuracy"][m].mean().item()},
                   "bag_optimum": {"loss": q["bag_loss"][m].mean().item(),
                                   "accuracy": q["bag_accuracy"][m].mean().item()},
                   "in_sight": {"targets": int(q["in_sight"].sum()),
                                "accuracy": {k: hits[k][q["in_sight"]].float().mean().item() for k in hits}}}
        return {"queries": metrics}, {"query_mask": m.numpy(), "query_window_loss": q["window_loss"].numpy(),
                                      "query_bag_loss": q["bag_loss"].numpy(),
                                      "query_bag_accuracy": q["bag_accuracy"].numpy(),
                                      "query_in_sight": q["in_sight"].numpy(),
                                      **{f"hit_{k}": v.numpy() for k, v in hits.items()}}
    spans = {"short": contexts[0], "long": contexts[1], "history": prefix}
    bayes = {k: bayes_logprobs(lang, ids, prefix, c) for k, c in spans.items()}
    loss = {k: -v.mean().item() for k, v in bayes.items()}
    return {"bayes": {"context": spans, "loss": loss, "gap": loss["short"] - loss["history"],
                      "gap_long": loss["short"] - loss["long"]}}, {f"bayes_{k}": v.numpy() for k, v in bayes.items()}


def retention_eval(model: SoftAR, ids: torch.Tensor, prefix: int, short: tuple[torch.Tensor, torch.Tensor],
                   long: tuple[torch.Tensor, torch.Tensor], contexts: tuple[int, int], seed: int = 0,
                   lang: Language | None = None) -> tuple[dict, dict]:
    """`softar eval --gap`: this model on the targets ids[:, prefix:] against a short and a long reference's scores
    of the same targets ((log p, hit) [N, K] each, `target_scores`; read from `contexts` tokens) -> (the `retention`
    metrics, the per-target arrays for a study's pooled bootstrap). `lang`, the synthetic language of the data,
    adds what its known optimum says (`known_answer`)."""
    scores = {"short": short, "long": long}
    lay = model.layout
    for ab in ABLATIONS if lay.n_summary else ("real",):
        scores[ab] = target_scores(model, ids, prefix, ablation=ab)
    arrays = {k: v[0] for k, v in scores.items()}
    window, history = contexts[0], prefix - contexts[0]  # the same subset for every model of a study
    cached = held_only_in_history(ids, prefix, window, history)
    loss = {k: -v.mean().item() for k, v in arrays.items()}
    s, m, lg = (arrays[k].numpy() for k in ("short", "real", "long"))
    result = {"targets": int(cached.numel()), "stretches": ids.shape[0], "window": window, "history": history,
              "loss": loss, "gap": loss["short"] - loss["long"], "loss_minus_short": loss["real"] - loss["short"],
              "gap_closed": gap_closed(s, m, lg),
              "gap_closed_ci": bootstrap_gap_closed(s[None], m[None], lg[None], seed=seed),  # one seed
              "cached": {"fraction": cached.float().mean().item(),
                         "loss": {k: -(v[cached]).mean().item() for k, v in arrays.items()}},
              "cache": {"long_vs_short": diff_ci(long[0], short[0], cached)}}
    if lay.n_summary:
        result["ablation"] = {ab: diff_ci(arrays["real"], arrays[ab]) for ab in ABLATIONS[1:]}
        result["cache"].update({ab: diff_ci(arrays["real"], arrays[ab], cached) for ab in ("swapped", "zeroed")})
    copies = copy_scores(lambda x, p: target_logprobs(model, x, p), ids[:COPY_STRETCHES], prefix)
    result["copy"] = {n: diff_ci(g, torch.zeros_like(g)) for n, g in copies.items()}
    out = {**{k: v.numpy() for k, v in arrays.items()}, "cached": cached.numpy()}
    if lang is not None:
        known, known_arrays = known_answer(lang, ids, prefix, contexts, arrays, {k: v[1] for k, v in scores.items()})
        result.update(known)
        out.update(known_arrays)
    return result, out


def context_curve(model: SoftAR, ids: torch.Tensor, prefix: int) -> dict[str, float]:
    """A plain model's loss on the targets ids[:, prefix:] at each context of `CONTEXTS` its window holds."""
    return {str(c): -target_logprobs(model, ids, prefix, c).mean().item() for c in CONTEXTS if c <= model.window_slots}


BOW_WINDOWS = (4096, 256)  # train and val stretches of the bag-of-words probe (a quarter of train held out)
BOW_STEPS = (25, 50, 100, 200)  # full-batch Adam steps; the probe keeps the one best on the held-out train part


def bag_of_words(ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """ids [N, h] -> [N, V] bool: which tokens occur."""
    return torch.zeros(ids.shape[0], vocab_size, dtype=torch.bool, device=ids.device).scatter_(1, ids, True)


@torch.no_grad()
def last_hidden(model: SoftAR, ids: torch.Tensor, prefix: int, context: int | None = None) -> torch.Tensor:
    """The last hidden state [N, d] of the window that predicts each stretch's token at `prefix`."""
    model.eval()
    return torch.cat([model.step(w, at=slice(-1, None)).hidden[:, -1].float() for _, w in
                      scored_windows(model, ids[:, : prefix + 1], prefix, context)])


def bow_probe(model: SoftAR, train_data: np.ndarray, data: np.ndarray, spans: dict[str, tuple[int, int]],
              prior: torch.Tensor, context: int | None = None, seed: int = 0, device: torch.device | str = "cpu"
              ) -> dict[str, dict[str, float]]:
    """A linear probe: can the bag of words of a span of text before a position be read from the model's last
    hidden state there? For each span name -> (gap, length): the `length` tokens that end `gap` tokens before the
    position. A logistic map hidden -> V per span, fitted on train stretches by full-batch Adam, its step count (of
    BOW_STEPS) chosen on a held-out quarter of them, then scored on val stretches by recall@k of the tokens the span
    holds, against the frequency prior's recall (`prior` [V]) on the same spans. The hidden states are read once
    for every span."""
    from softar.evaluate.context import recall_at_k

    V = model.E.shape[0]
    prefix = max(max(g + n for g, n in spans.values()), prefix_needed(model, context))
    sets = []
    for split, count, s in ((train_data, BOW_WINDOWS[0], seed + 1), (data, BOW_WINDOWS[1], seed)):
        ids = random_windows(split, prefix + 1, count, s, device)
        sets.append((last_hidden(model, ids, prefix, context), ids))
    (h_all, ids_all), (h_val, ids_val) = sets
    cut = h_all.shape[0] * 3 // 4
    mean, std = h_all[:cut].mean(0), h_all[:cut].std(0).clamp_min(1e-6)
    h_fit, h_held, h_val = ((h - mean) / std for h in (h_all[:cut], h_all[cut:], h_val))
    result = {}
    for name, (gap, n) in spans.items():
        y_all, y_val = (bag_of_words(ids[:, prefix - gap - n : prefix - gap], V) for ids in (ids_all, ids_val))
        scores = _fit_probe(h_fit, y_all[:cut].float(), h_held, y_all[cut:], seed)(h_val)
        r = recall_at_k(scores, y_val).nanmean().item()
        p = recall_at_k(prior.to(scores).expand_as(scores), y_val).nanmean().item()
        result[name] = {"recall_at_k": r, "prior_recall_at_k": p, "recall_minus_prior": r - p}
    return result


def _fit_probe(h_fit: torch.Tensor, y_fit: torch.Tensor, h_held: torch.Tensor, y_held: torch.Tensor, seed: int):
    """bow_probe's logistic map, at the step count of BOW_STEPS best on the held-out part -> the fitted map."""
    from softar.evaluate.context import recall_at_k

    gen = torch.Generator().manual_seed(seed)
    probe = torch.nn.Linear(h_fit.shape[1], y_fit.shape[1]).to(h_fit.device)
    with torch.no_grad():
        probe.weight.copy_(torch.randn(probe.weight.shape, generator=gen) * 0.01)
        probe.bias.copy_(torch.logit(y_fit.mean(0).clamp(1e-4, 1 - 1e-4)))  # start at the train frequencies
    opt = torch.optim.Adam(probe.parameters(), lr=1e-2)
    best, best_state = -1.0, None
    with torch.enable_grad():
        for step in range(1, max(BOW_STEPS) + 1):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(probe(h_fit), y_fit)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step in BOW_STEPS:
                with torch.no_grad():
                    held = recall_at_k(probe(h_held), y_held).nanmean().item()
                if held > best:
                    best, best_state = held, {k: v.clone() for k, v in probe.state_dict().items()}
    probe.load_state_dict(best_state)
    return lambda h: probe(h).detach()
