"""Free-running generation with soft tokens, coherence against nuance: how coherent the shown text stays (its
perplexity under a plain reference model), how diverse it is, its Brier score against the true continuation, and how
much of it re-entered soft, for each collapse policy against the frontier of plain sampling."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F

from softar.config import SoftConfig
from softar.data.dataset import random_windows
from softar.decode import Decoding
from softar.evaluate.stats import mean_se
from softar.soft.collapse import CollapsePolicy, Sampling
from softar.soft.feeds import HardFeed, SoftFeed
from softar.soft.model import SoftAR


@torch.no_grad()
def continuation_loss(reference: SoftAR, ids: torch.Tensor, start: int) -> float:
    """Mean cross-entropy of ids[:, start:] under a plain reference model, each token scored once from windows that
    slide by half a block (so every token but the first half-block has at least half a block of context)."""
    if not reference.layout.plain:
        raise ValueError("the reference must be a plain hard-token model")
    block, L = reference.window_slots, ids.shape[1]
    stride = max(1, block // 2)
    total, count, done = 0.0, 0, start  # targets before `done` are scored
    for s in range(0, L - 1, stride):
        e = min(s + block, L - 1)  # inputs ids[s:e] predict ids[s+1 : e+1]
        first = max(done, s + 1)
        if first <= e:
            logits = reference(ids[:, s:e])[:, first - s - 1 :]
            total += F.cross_entropy(logits.flatten(0, 1).float(), ids[:, first : e + 1].flatten(),
                                     reduction="sum").item()
            count += ids[:, first : e + 1].numel()
            done = e + 1
        if e == L - 1:
            break
    return total / count


def repeated_ngrams(ids: torch.Tensor, n: int = 4) -> float:
    """Fraction of the n-grams of each row [B, L] that already occurred earlier in that row (mean over rows)."""
    fracs = []
    for row in ids.tolist():
        grams = [tuple(row[i : i + n]) for i in range(len(row) - n + 1)]
        fracs.append(1 - len(set(grams)) / len(grams) if grams else 0.0)
    return sum(fracs) / len(fracs)


def distinct_ngrams(ids: torch.Tensor, n: int) -> float:
    """Diversity: the fraction of each row's n-grams that are distinct (mean over rows of [B, L])."""
    fracs = []
    for row in ids.tolist():
        grams = [tuple(row[i : i + n]) for i in range(len(row) - n + 1)]
        fracs.append(len(set(grams)) / len(grams) if grams else 0.0)
    return sum(fracs) / len(fracs)


@torch.no_grad()
def shown_brier(model: SoftAR, prompts: torch.Tensor, truth: torch.Tensor, dec: Decoding, draws: int = 16,
                seed: int = 0) -> tuple[float, float]:
    """Brier-n of the text a decoding shows, n = truth.shape[1]: `draws` independent continuations x_i of each
    prompt against its true continuation y, as the unbiased U-statistic 2 mean_i 1[x_i = y] - mean_{i != j}
    1[x_i = x_j]. -> (mean, standard error over prompts). It scores any decoding, soft or hard, the same way."""
    B, n = truth.shape
    x = replace(dec, max_new_tokens=n).run(model, prompts.repeat_interleave(draws, 0), seed=seed).tokens
    x = x.view(B, draws, n)
    hits = (x == truth[:, None]).all(-1).float().mean(1)
    same = (x[:, :, None] == x[:, None]).all(-1).float().sum((1, 2)) - draws  # pairs i != j
    per_prompt = 2 * hits - same / (draws * (draws - 1))
    return mean_se(per_prompt.cpu().numpy())


COLLAPSE_THRESHOLDS = (0.0, 2.0, 4.0, 5.0, 6.0, float("inf"))  # entropy, nats: characters to BPE
FRONTIER = tuple((t, p) for t in (0.6, 0.8, 1.0, 1.2) for p in (0.9, 1.0))  # plain sampling: temperature, top-p
POLICIES = ("collapse_uncertain", "keep_uncertain")


@torch.no_grad()
def generation_point(model: SoftAR, reference: SoftAR, prompts: torch.Tensor, truth: torch.Tensor, dec: Decoding,
                     new_tokens: int, seed: int) -> dict:
    """One decoding's free-running generation from the prompts: the shown text's perplexity under a plain
    reference model (coherence), its distinct 2- and 3-grams and repeated 4-grams (diversity), its Brier-2
    against the true continuation, the fraction of generated tokens that re-entered the context soft, and the OOD
    score over time (means over blocks of 32 steps)."""
    g = replace(dec, max_new_tokens=new_tokens).run(model, prompts, seed=seed)
    out, shown = g.full(), g.tokens
    hard = isinstance(dec.feed, HardFeed)
    soft = 0.0 if hard or model.layout.plain else 1 - g.collapsed.float().mean().item()
    brier, brier_se = shown_brier(model, prompts, truth, dec, seed=seed)
    point = {"reference_ppl": math.exp(continuation_loss(reference, out, prompts.shape[1])),
             "distinct_2": distinct_ngrams(shown, 2), "distinct_3": distinct_ngrams(shown, 3),
             "repeated_4grams": repeated_ngrams(shown), "brier2": brier, "brier2_se": brier_se, "soft_fraction": soft}
    if not hard and not model.layout.plain:
        sc = g.scores
        point.update(ood_mean=sc.mean().item(), ood_over_time=[c.mean().item() for c in sc.split(32, dim=1)])
    return point


@torch.no_grad()
def generation_report(model: SoftAR, reference: SoftAR, data: np.ndarray,
                      thresholds: tuple[float, ...] = COLLAPSE_THRESHOLDS, prompts: int = 64, prompt_len: int = 64,
                      new_tokens: int = 64, seed: int = 0) -> dict:
    """Coherence against nuance, from the same val prompts:

    - `frontier`: the model's plain sampling (every token collapsed) across temperature and top-p, the trade-off
      any sampler can already buy;
    - `collapse_uncertain`: soft generation (expected embeddings re-enter; shown tokens sampled from the LM head at
      temperature 1) that collapses a token in place when its entropy is above the threshold;
    - `keep_uncertain`: the opposite rule, collapsing the confident tokens and keeping the uncertain ones soft.

    A soft policy is worth something only where it lies beyond the frontier: more coherent at equal diversity."""
    model.eval()
    ids = random_windows(data, prompt_len + 2, prompts, seed, model.E.device)
    x, truth = ids[:, :prompt_len], ids[:, prompt_len:]
    args = (model, reference, x, truth)
    rows: dict[str, list[dict]] = {"frontier": []}
    for t, p in FRONTIER:
        dec = Decoding(HardFeed(Sampling(temperature=t, top_p=p)))
        rows["frontier"].append({"temperature": t, "top_p": p, **generation_point(*args, dec, new_tokens, seed)})
    for policy in POLICIES:
        rows[policy] = []
        for thr in thresholds:
            dec = Decoding(SoftFeed(SoftConfig(kind="expected"), collapse="lm_sample"),
                           CollapsePolicy(threshold=thr, keep_uncertain=policy == "keep_uncertain"))
            rows[policy].append({"threshold": thr, **generation_point(*args, dec, new_tokens, seed)})
    return rows


def frontier_gap(frontier: list[dict], point: dict, x: str = "distinct_2", y: str = "reference_ppl") -> float | None:
    """How far a point lies from the frontier: its y minus the frontier's y at the point's x (negative: beyond the
    frontier, more coherent at equal diversity). The frontier is the plain-sampling points no other one dominates
    (at least as diverse and at most as perplexed), joined by straight lines; a point less diverse than all of them
    is compared with the least diverse (also the most coherent). None when the point is more diverse than any
    frontier point."""
    pts = [(f[x], f[y]) for f in frontier]
    pareto = sorted({p for p in pts if not any(q != p and q[0] >= p[0] and q[1] <= p[1] for q in pts)})
    xs, ys = [p[0] for p in pareto], [p[1] for p in pareto]
    if point[x] > xs[-1]:
        return None
    return point[y] - float(np.interp(point[x], xs, ys))
