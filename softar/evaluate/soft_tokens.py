"""What a model's soft outputs are worth: teacher-forced distance to the next token's embedding, BrierLM at every
position, and the open-loop loss when the model reads its own outputs, against the strongest baselines. Read
through a plain window and the network's KV cache.

Every figure here is a mean over random windows, and every comparison is paired over the same windows: each
function returns per-window values, so `softar.evaluate.stats` can put bootstrap intervals on the differences."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from softar.config import SoftConfig
from softar.data.dataset import random_windows
from softar.decode import decode
from softar.evaluate.stats import at_bound, mean_se, paired_bootstrap, resolved
from softar.losses import fit_temperature
from softar.soft.collapse import Sampling, nearest, round_trip_gap
from softar.soft.feeds import ConstantFeed, Feed, HardFeed, SoftFeed, TeacherFeed
from softar.soft.model import SoftAR
from softar.soft.tokens import SOFT_TOKENS, heads_of, make_soft_token

AVERAGED = (1, 2, 4, 16)  # sampled rollouts averaged in probability: sampled_avg_S
AVERAGED_KNOWN = (*AVERAGED, 64)  # where the optimum is known (synthetic data): how close averaging gets to it
CONSTANTS = ("constant_mean", "constant_unigram", "zero")  # one fixed vector fed back at every step
BRIER_N = 4  # BrierLM is the geometric mean of Brier-1..4


def soft_kinds(model: SoftAR) -> list[str]:
    """The registered soft-token definitions this model can make."""
    heads = heads_of(model.lm)
    return [name for name, d in SOFT_TOKENS.items() if not d.needs_head or d.needs_head in heads]


def unigram(data: np.ndarray, vocab_size: int) -> torch.Tensor:
    """Add-one smoothed token frequencies of a split [V]: the frequency prior, the no-network reference."""
    counts = np.bincount(np.asarray(data, dtype=np.int64), minlength=vocab_size)[:vocab_size] + 1.0
    return torch.from_numpy(counts / counts.sum()).float()


def nn_spacing(E: torch.Tensor) -> float:
    """The mean distance from each embedding to its nearest other embedding: the unit in which distances in the
    space are comparable across configs."""
    E = E.detach().float()
    d = torch.cdist(E, E)
    d.fill_diagonal_(float("inf"))
    return d.min(-1).values.mean().item()


@torch.no_grad()
def soft_output_metrics(model: SoftAR, data: np.ndarray, windows: int = 64, seed: int = 0,
                        device: torch.device | str = "cpu") -> dict:
    """Teacher-forced quality of each soft token the model can make against the next token's embedding: l2,
    cosine, nearest-neighbour top-1 and the round-trip gap l2-r, both distances divided by the mean
    nearest-neighbour spacing of E (so configs with different scales compare); plus the LM head's top-1."""
    model.eval()
    ids = random_windows(data, model.window_slots + 1, windows, seed, device)
    x, y = ids[:, :-1], ids[:, 1:]
    E = model.E
    out = model.step(E[x])
    target = E[y]
    unit = nn_spacing(E)
    gen = torch.Generator(device=ids.device).manual_seed(seed)
    result = {"lm_top1": (out.logits.argmax(-1) == y).float().mean().item(), "nn_spacing": unit}
    for kind in soft_kinds(model):
        v = make_soft_token(out, E, SoftConfig(kind=kind), gen)
        result[kind] = {
            "l2": (v - target).norm(dim=-1).mean().item() / unit,
            "cosine": F.cosine_similarity(v, target, dim=-1).mean().item(),
            "nn_top1": (nearest(v, E) == y).float().mean().item(),
            "l2_r": round_trip_gap(v, E).mean().item() / unit,
        }
    return result


# -- open-loop rollouts ---------------------------------------------------------------------------------------------

@torch.no_grad()
def rollout(model: SoftAR, ids: torch.Tensor, prefix: int, horizon: int, feed: Feed,
            generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """From the true prefix ids[:, :prefix + 1], `horizon` steps in which the model reads what `feed` gives it
    (drawing from `generator`, one stream for all windows) -> (the logits of every step [W, horizon, V], step k
    predicting ids[:, prefix + 1 + k]; the tokens the feed showed [W, horizon - 1])."""
    g = decode(model, ids[:, : prefix + 1], feed, horizon - 1, seed=generator or torch.Generator(model.E.device),
               return_logits=True)
    return g.logits, g.tokens


def _truth_logp(logits: torch.Tensor, truth: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(truth) per window and step [W, K]."""
    return (logits / temperature).log_softmax(-1).gather(-1, truth.unsqueeze(-1)).squeeze(-1)


def _feeds(model: SoftAR, truth: torch.Tensor, prior: torch.Tensor, samples: int) -> dict[str, Feed]:
    """Every feedback mode -> its feed. Sampled rollout s is `sampled_<s>` (drawn with seed + s: rollout 0 draws what
    a single sampled rollout always drew); soft modes run two independent paths (`soft_<kind>#0`, `#1`)."""
    E = model.E
    feeds: dict[str, Feed] = {"teacher": TeacherFeed(truth), "greedy": HardFeed(Sampling(temperature=0.0))}
    feeds.update({f"sampled_{s}": HardFeed(Sampling(temperature=1.0)) for s in range(samples)})
    vectors = {"constant_mean": E.mean(0), "constant_unigram": prior.to(E) @ E, "zero": torch.zeros_like(E[0])}
    feeds.update({name: ConstantFeed(vectors[name]) for name in CONSTANTS})
    for kind in soft_kinds(model):  # two independent paths each: the shown text's Brier needs a pair
        feeds.update({f"soft_{kind}#{s}": SoftFeed(SoftConfig(kind=kind), noisy=False) for s in (0, 1)})
    return feeds


def _seed_of(mode: str, seed: int) -> int:
    """The stream of a feedback mode: path s of a sampled or soft mode draws from seed + s."""
    return seed + int(mode.rsplit("_", 1)[1]) if mode.startswith("sampled_") else \
        seed + int(mode.rsplit("#", 1)[1]) if "#" in mode else seed


def effective_samples(losses: dict[int, float], soft: float) -> tuple[float | None, str]:
    """The number of averaged sampled rollouts whose loss equals the soft feedback's, interpolated linearly in
    log2 S between the measured S on the running minimum of the losses (more rollouts never do worse): (S,
    "within"), or the end of the range with "below" (soft is worse than one rollout) or "above" (better than the
    most rollouts measured); (None, "undefined") when a loss is not finite."""
    S = sorted(losses)
    if not all(math.isfinite(x) for x in (*losses.values(), soft)):
        return None, "undefined"
    best = dict(zip(S, np.minimum.accumulate([losses[s] for s in S]).tolist(), strict=True))
    if soft >= best[S[0]]:
        return float(S[0]), "below"
    for a, b in zip(S, S[1:], strict=False):
        if best[a] >= soft >= best[b]:
            frac = (best[a] - soft) / (best[a] - best[b]) if best[a] != best[b] else 0.0
            return float(2 ** (math.log2(a) + frac * (math.log2(b) - math.log2(a)))), "within"
    return float(S[-1]), "above"


def format_effective(value: float | None, where: str) -> str:
    """S* as tables print it: "2.74" within the measured S, "<1" or ">64" censored at an end, "?" undefined."""
    return "?" if value is None else f"{value:.2f}" if where == "within" else \
        f"{'<' if where == 'below' else '>'}{value:g}"


@torch.no_grad()
def fit_greedy_temperature(model: SoftAR, train_data: np.ndarray, horizon: int, windows: int = 64,
                           seed: int = 0) -> float:
    """The temperature that best calibrates greedy rollouts of `horizon` steps on train windows (open-loop
    calibration): greedy feedback is deterministic, so its raw probabilities are overconfident off the truth."""
    block = model.window_slots
    ids = random_windows(train_data, block + 1, windows, seed + 1, model.E.device)
    prefix = block - horizon
    logits, _ = rollout(model, ids, prefix, horizon, HardFeed(Sampling(temperature=0.0)))
    return fit_temperature(logits.flatten(0, 1), ids[:, prefix + 1 :].flatten())


@torch.no_grad()
def open_loop_loss(model: SoftAR, data: np.ndarray, horizon: int, train_data: np.ndarray | None = None,
                   windows: int = 64, seed: int = 0, device: torch.device | str = "cpu",
                   n_boot: int = 2000, averaged: tuple[int, ...] = AVERAGED,
                   bayes: Callable[[torch.Tensor, int, int], torch.Tensor] | None = None) -> dict:
    """Cross-entropy on the true next `horizon` tokens when, for those steps, the model's inputs are its own outputs
    instead of the truth, for every feedback mode, on the same windows:

    - `teacher` (the truth, for reference), `greedy`, and `greedy_calibrated` (greedy rollouts scored with the
      probabilities at a temperature fitted on train, when `train_data` is given);
    - `sampled_avg_S`, S in `averaged` (default 1, 2, 4, 16): the loss of the *mean* probability over S sampled
      rollouts, the model's own k-step prediction (one rollout scored alone rewards hedging);
    - `constant_mean`, `constant_unigram`, `zero`: a fixed vector fed back at every step, which carries no
      information; `unigram`: the frequency prior alone, no network (from `train_data`, else this split);
    - `soft_<kind>` for each soft token the model can make;
    - `bayes`, where the data's optimum is known: `bayes(ids [W, T + 1], prefix, horizon)` gives the exact log
      p(truth) [W, horizon] from the prefix alone (`softar.data.synthetic.HMM.open_loop`), the open-loop ceiling.

    Also per-step loss curves (`per_step`), per-window losses (`per_window`, for paired comparisons across runs on
    the same windows), each mode's difference to the model's own soft feedback with a paired
    bootstrap 95% interval over windows (`vs_soft`), the `effective_samples` S at which averaged rollouts match soft
    feedback (which costs about one rollout), and the Brier-n of the *shown* text for every mode (`brier_shown`)."""
    model.eval()
    E, block = model.E, model.window_slots
    if not 1 <= horizon < block:
        raise ValueError(f"horizon {horizon} must be in [1, block_size={block})")
    prefix = block - horizon
    ids = random_windows(data, block + 1, windows, seed, device)
    truth = ids[:, prefix + 1 :]  # [W, K]: the tokens each step must predict
    prior = unigram(train_data if train_data is not None else data, E.shape[0]).to(E.device)
    logp, first, drawn = {}, {}, {}  # mode -> [W, K]; the first steps' logits [W, n, V] (for Brier); draws
    greedy_logits = None
    for mode, feed in _feeds(model, truth, prior, max(averaged)).items():
        gen = torch.Generator(device=E.device).manual_seed(_seed_of(mode, seed))
        logits, drawn[mode] = rollout(model, ids, prefix, horizon, feed, gen)
        logp[mode], first[mode] = _truth_logp(logits, truth), logits[:, :BRIER_N]
        if mode == "greedy":
            greedy_logits = logits
    samples = torch.stack([logp.pop(f"sampled_{s}") for s in range(max(averaged))])  # [S, W, K]
    for S in averaged:
        logp[f"sampled_avg_{S}"] = samples[:S].logsumexp(0) - math.log(S)
    logp["unigram"] = prior.log()[truth]
    if bayes is not None:
        logp["bayes"] = bayes(ids, prefix, horizon).to(logp["unigram"])
    temperature = None
    if train_data is not None:
        temperature = fit_greedy_temperature(model, train_data, horizon, windows, seed)
        logp["greedy_calibrated"] = _truth_logp(greedy_logits, truth, temperature)
    for kind in soft_kinds(model):
        logp[f"soft_{kind}"] = logp.pop(f"soft_{kind}#0")
        del logp[f"soft_{kind}#1"]
    per_window = {mode: -lp.mean(1) for mode, lp in logp.items()}  # [W]
    result: dict = {mode: v.mean().item() for mode, v in per_window.items()}
    result["per_step"] = {mode: (-lp.mean(0)).tolist() for mode, lp in logp.items()}
    result["per_window"] = {mode: v.tolist() for mode, v in per_window.items()}  # for paired comparisons
    soft_mode = f"soft_{model.soft_spec.kind}"
    if soft_mode not in per_window:
        soft_mode = "soft_expected"
    result["soft_feedback"] = soft_mode
    result["vs_soft"] = {mode: paired_bootstrap(v.cpu(), per_window[soft_mode].cpu(), n_boot, seed)
                         for mode, v in per_window.items() if mode != soft_mode}
    result["effective_samples"], result["effective_samples_range"] = effective_samples(
        {S: result[f"sampled_avg_{S}"] for S in averaged}, result[soft_mode])
    if temperature is not None:
        result["greedy_temperature"], result["greedy_temperature_at_bound"] = temperature, at_bound(temperature)
    if horizon >= 2:
        result["brier_shown"] = brier_of_shown_text(model, first, drawn, truth)
    return result


def brier_of_shown_text(model: SoftAR, logits: dict[str, torch.Tensor], drawn: dict[str, torch.Tensor],
                        truth: torch.Tensor) -> dict:
    """Brier-n (n up to min(4, K)) of the text each feedback mode shows over the first n open-loop steps, against
    the true n-gram, per window, in its low-variance form 2 P(y) - sum_x P(x)^2:

    - sampled (the shown token is fed back): P(y) exactly from the teacher-forced steps; sum_x P(x)^2 from a
      sampled path x, as P(x_1..x_{n-1}) * sum_v P(v | x_1..x_{n-1})^2, averaged over two paths;
    - greedy: the text is certain, 2 * 1[x = y] - 1;
    - soft and constant feedback (the fed-back vector does not depend on the shown token, drawn from each step's
      distribution p_k): with two independent paths a, b, P(y) = mean of prod_k p_k(y_k) over the paths and
      sum_x P(x)^2 = prod_k sum_v p^a_k(v) p^b_k(v)."""
    n_max = min(BRIER_N, truth.shape[1])
    p = {mode: lg[:, :n_max].softmax(-1) for mode, lg in logits.items()}  # [W, n, V]
    hit = {mode: pr.gather(-1, truth[:, :n_max, None]).squeeze(-1) for mode, pr in p.items()}  # [W, n]
    estimates: dict[str, list[torch.Tensor]] = {}
    for mode in ("greedy", "sampled", *CONSTANTS, *(f"soft_{k}" for k in soft_kinds(model))):
        rows = []
        for n in range(1, n_max + 1):
            if mode == "greedy":
                x = p["greedy"][:, :n].argmax(-1)
                rows.append(2 * (x == truth[:, :n]).all(-1).float() - 1)
            elif mode == "sampled":
                p_y = hit["teacher"][:, :n].prod(-1)
                q = 0
                for s in (0, 1):
                    pr = p[f"sampled_{s}"]
                    x = drawn[f"sampled_{s}"][:, : n - 1]  # [W, n-1]
                    q = q + pr[:, : n - 1].gather(-1, x[..., None]).squeeze(-1).prod(-1) * pr[:, n - 1].pow(2).sum(-1)
                rows.append(2 * p_y - q / 2)
            else:
                a, b = (f"{mode}#0", f"{mode}#1") if mode.startswith("soft_") else (mode, mode)
                p_y = (hit[a][:, :n].prod(-1) + hit[b][:, :n].prod(-1)) / 2
                rows.append(2 * p_y - (p[a][:, :n] * p[b][:, :n]).sum(-1).prod(-1))
        estimates[mode] = rows
    out = {}
    for mode, rows in estimates.items():
        cell = {}
        for n, r in enumerate(rows, start=1):
            cell[f"brier{n}"], cell[f"brier{n}_se"] = mean_se(r.cpu().numpy())
        out[mode] = cell
    return out


@torch.no_grad()
def brier_lm(model: SoftAR, data: np.ndarray, windows: int = 64, seed: int = 0, device: torch.device | str = "cpu",
             max_positions: int = 64) -> dict:
    """BrierLM (CALM) at every position of random windows whose 4 next tokens lie inside the window (at most
    `max_positions` evenly spaced ones per window), in the low-variance form Brier-n = 2 P(y) - sum_x P(x)^2 for the
    true n-gram y:

    - P(y) is exact: the product of the teacher-forced probabilities of y's tokens;
    - sum_x P(x)^2 is exact for n = 1, and for n > 1 is estimated without bias from one path x sampled from the
      model: P(x_1..x_{n-1}) * sum_v P(v | x_1..x_{n-1})^2.

    Standard errors are over windows (positions in one window are not independent). BrierLM = 100 x the geometric
    mean of Brier-1..4, with a delta-method standard error; it is None when any Brier-n mean is not positive. Nothing
    is clamped; `unresolved` names the figures whose 95% interval includes 0."""
    model.eval()
    E, T = model.E, model.window_slots
    if T < BRIER_N:
        raise ValueError(f"BrierLM needs a window of at least {BRIER_N} slots")
    ids = random_windows(data, T + 1, windows, seed, device)
    starts = np.unique(np.linspace(0, T - BRIER_N, min(max_positions, T - BRIER_N + 1)).round().astype(int))
    gen = torch.Generator(device=ids.device).manual_seed(seed)
    chunk = max(1, 2**28 // (T * E.shape[0]))  # windows per pass: about 1 GB of probabilities at a time
    est = torch.cat([_brier_estimates(model, part, starts.tolist(), gen) for part in ids.split(chunk)], dim=1)
    per_window = est.mean(-1).double().cpu().numpy()  # [n, W]
    result: dict = {"positions_per_window": len(starts), "windows": ids.shape[0],
                    "per_window": {f"brier{n + 1}": per_window[n].tolist() for n in range(BRIER_N)}}
    means = per_window.mean(1)
    for n in range(BRIER_N):
        result[f"brier{n + 1}"], result[f"brier{n + 1}_se"] = mean_se(per_window[n])
    if (means > 0).all():
        lm_score = 100 * float(np.exp(np.log(means).mean()))
        grad = lm_score / BRIER_N / means  # d BrierLM / d Brier-n
        cov = np.cov(per_window) / per_window.shape[1] if per_window.shape[1] > 1 else np.zeros((BRIER_N, BRIER_N))
        result["brierlm"], result["brierlm_se"] = lm_score, float(np.sqrt(grad @ cov @ grad))
    else:
        result["brierlm"] = result["brierlm_se"] = None
    names = [f"brier{n + 1}" for n in range(BRIER_N)] + ["brierlm"]
    result["unresolved"] = [k for k in names if result[k] is None or not resolved(result[k], result[f"{k}_se"])]
    return result


def _brier_estimates(model: SoftAR, ids: torch.Tensor, starts: list[int], gen: torch.Generator) -> torch.Tensor:
    """Brier-1..4 estimates [n, W, positions] for windows ids [W, T + 1] at the given start positions."""
    E = model.E
    p = model.step(E[ids[:, :-1]]).logits.float().softmax(-1)  # [W, T, V]
    hit = p.gather(-1, ids[:, 1:, None]).squeeze(-1)  # [W, T]: p_t(y_t+1)
    est = torch.zeros(BRIER_N, ids.shape[0], len(starts), device=ids.device)
    for i, t in enumerate(starts):  # a path x sampled from each start: the distributions along it
        logits, x = rollout(model, ids, t, BRIER_N, HardFeed(Sampling(temperature=1.0)), gen)
        pk = logits.softmax(-1)  # [W, n, V]: the first is p_t, then p(. | x_1 .. x_k)
        path = torch.cat([torch.ones_like(x[:, :1], dtype=pk.dtype),
                          pk[:, :-1].gather(-1, x[..., None])[..., 0].cumprod(1)], dim=1)  # [W, n]
        for n in range(1, BRIER_N + 1):
            est[n - 1, :, i] = 2 * hit[:, t : t + n].prod(-1) - path[:, n - 1] * pk[:, n - 1].pow(2).sum(-1)
    return est
