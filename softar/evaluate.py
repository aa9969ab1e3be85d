"""Metrics: sampled-batch loss estimates for periodic evals, and exact loss over a whole split."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from softar.collapse import collapse, round_trip_gap, sample_ids
from softar.data.dataset import WindowSampler, sequential_windows
from softar.distributed import World
from softar.generate import Decoding, generate, next_token
from softar.losses import lm_loss
from softar.model import GPT, KVCache


@torch.no_grad()
def estimate_loss(model: GPT, data: np.ndarray, block_size: int, batch_size: int, iters: int, seed: int,
                  device: torch.device, autocast_ctx, history: int = 0) -> float:
    """Mean loss over `iters` random batches drawn with their own generator, so evals never move the
    training sampler's RNG (which keeps resumed runs exact). block_size: the token slots of a window; history:
    the layout's history (`Layout.history`)."""
    was_training = model.training
    model.eval()
    sampler = WindowSampler(data, block_size, batch_size, seed, history=history)
    losses = []
    for _ in range(iters):
        x, y, *hist = (t.to(device) for t in sampler.next_batch())
        with autocast_ctx:
            losses.append(lm_loss(model(x, history=tuple(hist) or None), y))
    model.train(was_training)
    return torch.stack(losses).mean().item()


@torch.no_grad()
def evaluate_split(model: GPT, data: np.ndarray, block_size: int, device: torch.device, autocast_ctx,
                   characters: int | None = None, batch_size: int = 64, world: World | None = None,
                   history: int = 0, soft: int = 0) -> dict:
    """Loss over every token of a split (each predicted once, from consecutive windows), in nats and bits
    per token, plus bits per character when the split's character count is known. Under data parallelism each
    rank takes every world-th batch and the sums are reduced; all ranks run the same number of forwards (a
    sharded model's forward is collective), the ones past the end on a batch whose result is discarded. With a
    layout, block_size is its token slots, each window gets the `history` tokens before it, and with `soft` slots
    the loss is also split into the positions whose inputs are hard tokens and those that read soft ones."""
    world = world or World()
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss and count: hard slots, soft slots
    batches = list(sequential_windows(data, block_size, batch_size, history))
    for i in range(world.rank, -(-len(batches) // world.size) * world.size, world.size):
        x, y, *hist = (v.to(device) for v in batches[min(i, len(batches) - 1)])
        with autocast_ctx:
            logits = model(x, history=tuple(hist) or None)
        k = min(soft, y.shape[1])
        if k:
            per = lm_loss(logits, y, reduction="none").view(y.shape).double()
            part = torch.stack((per[:, :-k].sum(), per[:, -k:].sum()))
        else:
            part = torch.stack((lm_loss(logits, y, reduction="sum").double(), sums.new_zeros(())))
        n = torch.tensor([y.shape[0] * (y.shape[1] - k), y.shape[0] * k], dtype=torch.float64, device=device)
        if i < len(batches):
            sums += torch.stack((part[0], n[0], part[1], n[1]))
    model.train(was_training)
    hard_loss, hard_n, soft_loss, soft_n = (world.mean(sums) * world.size).tolist()
    total, count = hard_loss + soft_loss, int(hard_n + soft_n)
    loss = total / count
    out = {"loss": loss, "bits_per_token": loss / math.log(2), "tokens": count}
    if characters:
        out["bits_per_char"] = total / math.log(2) / characters
    if soft:
        out["loss_hard_slots"], out["loss_soft_slots"] = hard_loss / hard_n, soft_loss / soft_n
    return out


def _windows(data: np.ndarray, length: int, count: int, seed: int, device: torch.device) -> torch.Tensor:
    """`count` random windows of `length` tokens, drawn with their own generator: [count, length]."""
    sampler = WindowSampler(data, length - 1, count, seed)
    x, y = sampler.next_batch()
    return torch.cat([x, y[:, -1:]], dim=1).to(device)


@torch.no_grad()
def soft_output_metrics(model: GPT, data: np.ndarray, windows: int = 64, seed: int = 0,
                        device: torch.device | str = "cpu") -> dict:
    """Teacher-forced quality of the model's soft outputs against the next token's embedding: l2, cosine,
    nearest-neighbour top-1 and the round-trip gap l2-r, for the expected embedding p @ E (every model) and the
    vector head's y (models that have one); plus the LM head's top-1 for reference."""
    model.eval()
    ids = _windows(data, model.cfg.block_size + 1, windows, seed, device)
    x, y = ids[:, :-1], ids[:, 1:]
    E = model.embed.weight
    out = model.heads(model.hidden(model.embed(x)))
    target = E[y]
    vectors = {"expected": out["logits"].float().softmax(-1) @ E}
    if "y" in out:
        vectors["regress"] = out["y"]
    result = {"lm_top1": (out["logits"].argmax(-1) == y).float().mean().item()}
    for name, v in vectors.items():
        result[name] = {
            "l2": (v - target).norm(dim=-1).mean().item(),
            "cosine": F.cosine_similarity(v, target, dim=-1).mean().item(),
            "nn_top1": (collapse("nn_l2", E, v) == y).float().mean().item(),
            "l2_r": round_trip_gap(v, E).mean().item(),
        }
    return result


FEEDBACK = {"greedy": Decoding(mode="hard", temperature=0), "sampled": Decoding(mode="hard", temperature=1.0)}


def feedback_modes(model: GPT) -> list[str]:
    """What an open-loop rollout can feed back: the truth (teacher), collapsed tokens, or each soft token."""
    modes = ["teacher", "greedy", "sampled", "soft_expected", "soft_hidden", "soft_gated"]
    return modes + (["soft_regress"] if model.vector_head is not None else [])


@torch.no_grad()
def open_loop_loss(model: GPT, data: np.ndarray, horizon: int, modes: list[str] | None = None, windows: int = 64,
                   seed: int = 0, device: torch.device | str = "cpu") -> dict[str, float]:
    """Cross-entropy on the true next `horizon` tokens when, for those steps, the model's inputs are its own outputs
    (soft tokens, or its greedy or sampled collapse) instead of the truth. The prefix fills the rest of the window.
    `teacher` feeds the truth: the teacher-forced loss on the same positions, for reference."""
    model.eval()
    block = model.cfg.block_size
    if not 1 <= horizon < block:
        raise ValueError(f"horizon {horizon} must be in [1, block_size={block})")
    prefix = block - horizon
    ids = _windows(data, block + 1, windows, seed, device)
    truth = ids[:, prefix + 1 :]  # [B, horizon]: the tokens each step must predict
    E = model.embed.weight
    results = {}
    for mode in modes or feedback_modes(model):
        gen = torch.Generator(device=ids.device).manual_seed(seed)
        cache = KVCache(model.cfg, ids.shape[0], block, ids.device, E.dtype)
        out = model.heads(model.hidden(model.embed(ids[:, : prefix + 1]), cache=cache)[:, -1:])
        losses = []
        for k in range(horizon):
            logits = out["logits"][:, -1]
            losses.append(F.cross_entropy(logits.float(), truth[:, k]))
            if k == horizon - 1:
                break
            if mode == "teacher":
                vec = E[truth[:, k]]
            else:  # the same step choice generation makes
                dec = FEEDBACK.get(mode) or Decoding(mode="soft", soft_kind=mode.removeprefix("soft_"))
                vec = next_token(model, out, dec, gen)[0]
            out = model.heads(model.hidden(vec.unsqueeze(1), cache=cache))
        results[mode] = torch.stack(losses).mean().item()
    return results


@torch.no_grad()
def brier_lm(model: GPT, data: np.ndarray, windows: int = 64, seed: int = 0, max_n: int = 4,
             device: torch.device | str = "cpu") -> dict[str, float]:
    """BrierLM (CALM): from the true prefix draw two independent n-token continuations x1, x2 from the model; the
    unbiased Brier-n estimate is 1[x1 = y] + 1[x2 = y] - 1[x1 = x2] for the true n-gram y. BrierLM is 100 times the
    geometric mean of Brier-1..4. Samples come from the LM head at temperature 1, the same way for every model."""
    model.eval()
    block = model.cfg.block_size
    prefix = block - max_n
    ids = _windows(data, block + 1, windows, seed, device)
    truth = ids[:, prefix + 1 : prefix + 1 + max_n]
    gen = torch.Generator(device=ids.device).manual_seed(seed)
    draws = []
    for _ in range(2):
        cache = KVCache(model.cfg, ids.shape[0], block, ids.device, model.embed.weight.dtype)
        logits = model(ids[:, : prefix + 1], cache=cache)[:, -1]
        seq = []
        for k in range(max_n):
            tok = sample_ids(logits, gen)
            seq.append(tok)
            if k < max_n - 1:
                logits = model(tok.unsqueeze(1), cache=cache)[:, -1]
        draws.append(torch.stack(seq, dim=1))
    x1, x2 = draws
    result = {}
    for n in range(1, max_n + 1):
        hit1, hit2, agree = ((a[:, :n] == b[:, :n]).all(-1).float() for a, b in ((x1, truth), (x2, truth), (x1, x2)))
        result[f"brier{n}"] = (hit1 + hit2 - agree).mean().item()
    product = math.prod(max(result[f"brier{n}"], 0.0) for n in range(1, max_n + 1))
    result["brierlm"] = 100 * product ** (1 / max_n)
    return result


def last_hard_logits(model: GPT, seq: torch.Tensor) -> torch.Tensor:
    """The model's prediction after the last token of seq [B, L], read from the last hard slot: a plain model sees
    the last block_size tokens; a layout model puts the last `hard` tokens in its hard region (its soft region,
    which holds the model's own guesses, then follows but cannot see the future) and the rest in its history.
    Returns logits [B, V]."""
    lay = model.layout
    if lay.plain:
        return model(seq[:, -model.cfg.block_size :])[:, -1]
    pad = seq[:, -1:].expand(-1, lay.soft)  # placeholders: soft slots come after the slot we read
    tokens = torch.cat([seq[:, -lay.hard :], pad], dim=1)
    hist = seq[:, : -lay.hard][:, -lay.history :] if lay.history else seq[:, :0]
    hist_len = torch.full((seq.shape[0],), hist.shape[1], device=seq.device)
    return model(tokens, history=(hist, hist_len))[:, lay.hard - 1]


PASSKEY_DISTANCES = (16, 48, 96, 192, 384)


@torch.no_grad()
def passkey_probe(model: GPT, data: np.ndarray, distances: tuple[int, ...] = PASSKEY_DISTANCES, windows: int = 64,
                  seed: int = 0, device: torch.device | str = "cpu") -> dict:
    """A pair (a, x) of random tokens planted N tokens before the end of a stretch of val text that then ends in a:
    does the model say x next? Per distance N: top-1 accuracy, and the mean gain in log p(x) over the same text
    without the plant (0 when the plant is outside everything the model sees)."""
    model.eval()
    lay = model.layout
    length = max(distances) + 2 + (lay.history + lay.hard if not lay.plain else model.cfg.block_size)
    ids = _windows(data, length, windows, seed, device)
    gen = torch.Generator().manual_seed(seed)
    V = model.cfg.vocab_size
    a = torch.randint(V, (windows,), generator=gen).to(ids.device)
    x = (a + 1 + torch.randint(V - 1, (windows,), generator=gen).to(ids.device)) % V  # x != a
    rows = torch.arange(windows, device=ids.device)
    result = {}
    for n in distances:
        query = ids.clone()
        query[:, -1] = a
        planted = query.clone()
        planted[:, -1 - n], planted[:, -n] = a, x
        with_plant, without = (last_hard_logits(model, q).float().log_softmax(-1) for q in (planted, query))
        hit = with_plant.argmax(-1) == x
        gain = with_plant[rows, x] - without[rows, x]
        result[str(n)] = {"accuracy": hit.float().mean().item(), "logp_gain": gain.mean().item()}
    return result


RECOVERY_HISTORY = (64, 128, 256, 512)


@torch.no_grad()
def recovery_probe(model: GPT, data: np.ndarray, history_lengths: tuple[int, ...] = RECOVERY_HISTORY,
                   windows: int = 64, seed: int = 0, device: torch.device | str = "cpu") -> dict:
    """How much of the history can be read back out of the summary slots by embedding arithmetic alone: rank the
    vocabulary by cosine to the slot vector and count how many of the distinct tokens the slot holds are among the
    top k, k = their number (recall@k). Per slot kind and history length, with the chance level k / V."""
    from softar.context import normalize, summary_weights

    model.eval()
    lay, E = model.layout, model.embed.weight
    if not lay.n_summary:
        return {}
    En = F.normalize(E.float(), dim=-1)
    kinds = ["aggregate"] * lay.aggregate + ["segment"] * len(lay.segments)
    result = {}
    for n in history_lengths:
        hist = _windows(data, n, windows, seed, device)
        W, counts = summary_weights(hist, torch.full((windows,), n, device=hist.device), lay, E.shape[0])
        slots = normalize(W, counts, lay.op) @ E.float()  # [B, s, m]
        sims = F.normalize(slots, dim=-1) @ En.T  # [B, s, V]
        held = W > 0
        k = held.sum(-1)  # distinct tokens per slot
        order = sims.argsort(dim=-1, descending=True).argsort(dim=-1)  # rank of each token
        hits = (held & (order < k.unsqueeze(-1))).sum(-1)
        recall = torch.where(k > 0, hits / k.clamp_min(1), torch.nan)
        cell = {}
        for kind in dict.fromkeys(kinds):
            cols = [i for i, kd in enumerate(kinds) if kd == kind]
            r, kk = recall[:, cols], k[:, cols].float()
            if torch.isnan(r).all():
                continue
            cell[kind] = {"recall_at_k": r.nanmean().item(), "k": kk[kk > 0].mean().item(),
                          "chance": (kk[kk > 0] / E.shape[0]).mean().item()}
        result[str(n)] = cell
    return result


def fraction_of_gap(short: float, with_slots: float, long: float) -> float:
    """(L_short - L_slots) / (L_short - L_long): 0 = the slots add nothing, 1 = as good as the long window."""
    return (short - with_slots) / (short - long)


@torch.no_grad()
def continuation_loss(reference: GPT, ids: torch.Tensor, start: int) -> float:
    """Mean cross-entropy of ids[:, start:] under a plain reference model, each token scored once from windows that
    slide by half a block (so every token but the first half-block has at least half a block of context)."""
    if not reference.layout.plain:
        raise ValueError("the reference must be a plain hard-token model")
    block, L = reference.cfg.block_size, ids.shape[1]
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


COLLAPSE_THRESHOLDS = (0.0, 1.0, 2.0, 3.0, 4.0, 4.5, 5.0, 5.5, 6.0, float("inf"))  # nats: characters to BPE


@torch.no_grad()
def generation_report(model: GPT, reference: GPT, data: np.ndarray,
                      thresholds: tuple[float, ...] = COLLAPSE_THRESHOLDS, score: str = "entropy",
                      prompts: int = 8, prompt_len: int = 64, new_tokens: int = 256, seed: int = 0,
                      temperature: float = 0.8, top_k: int = 200) -> list[dict]:
    """Free-running soft generation from val prompts at each collapse threshold: the shown (collapsed) text's
    perplexity under a plain reference run (coherence), its repeated 4-grams, the fraction of tokens the policy
    collapsed in place (1 - that fraction of tokens re-entered soft: nuance), and the OOD score over time
    (means over blocks of 32 steps). Soft tokens are expected embeddings; shown tokens are sampled from the LM head
    (`lm_sample`), so threshold 0 is ordinary sampling."""
    model.eval()
    ids = _windows(data, prompt_len, prompts, seed, model.embed.weight.device)
    rows = []
    for thr in thresholds:
        dec = Decoding(mode="soft", temperature=temperature, top_k=top_k, soft_kind="expected",
                       collapse_kind="lm_sample", collapse_score=score, collapse_threshold=thr)
        report: dict = {}
        gen = torch.Generator(ids.device).manual_seed(seed)
        out = generate(model, ids, new_tokens, generator=gen, decoding=dec, report=report)
        rate = report["by_policy"].float().mean().item()
        sc = report["scores"]
        rows.append({"threshold": thr, "collapse_rate": rate, "soft_fraction": 1 - rate,
                     "reference_ppl": math.exp(continuation_loss(reference, out, prompt_len)),
                     "repeated_4grams": repeated_ngrams(out[:, prompt_len:]),
                     "ood_mean": sc.mean().item(),
                     "ood_over_time": [c.mean().item() for c in sc.split(32, dim=1)]})
    return rows


DEFAULT_HORIZONS = (8, 32)


def evaluate_run(run_dir, split: str = "val", data_dir: str | None = None, windows: int = 256,
                 horizons: tuple[int, ...] | None = None, seed: int = 0, device_name: str = "auto",
                 gap_runs: tuple[str, str] | None = None, reference: str | None = None,
                 thresholds: tuple[float, ...] = COLLAPSE_THRESHOLDS) -> dict:
    """Every metric `softar eval` reports, for a run directory's latest checkpoint. Without `horizons`, the
    open-loop loss is measured at those of 8 and 32 that fit in the model's window. `gap_runs` (a short-window and
    a long-window run) adds the fraction of the gap closed; `reference` (a plain run) adds the generation report."""
    from softar import SoftarError
    from softar.data.dataset import load_meta, load_split
    from softar.device import autocast, pick_device
    from softar.model.embedding import embedding_stats
    from softar.rundir import RESULT_FILE, load_run

    device = pick_device(device_name)
    run = load_run(run_dir, device, data_dir)
    data_dir = data_dir or run.cfg.data.dir
    lay = run.model.layout
    block = run.cfg.model.block_size
    if horizons is None:
        horizons = tuple(k for k in DEFAULT_HORIZONS if k < block)
    for k in horizons:
        if not 1 <= k < block:
            raise SoftarError(f"--horizons: {k} must be in [1, model.block_size={block})")
    data = load_split(data_dir, split)
    chars = load_meta(data_dir)["characters"][split]
    metrics = evaluate_split(run.model, data, lay.tokens, device, autocast(device, run.cfg.train.dtype), chars,
                             history=lay.history, soft=lay.soft)
    kw = dict(windows=windows, seed=seed, device=device)
    result = {"run_dir": str(run_dir), "step": run.step, "split": split, **metrics,
              "embedding": embedding_stats(run.model.embed.weight),
              "passkey": passkey_probe(run.model, data, windows=min(windows, 64), seed=seed, device=device)}
    if lay.plain:  # these read the model through a plain window (and a KV cache)
        result.update(soft_outputs=soft_output_metrics(run.model, data, **kw), brier=brier_lm(run.model, data, **kw),
                      open_loop={str(k): open_loop_loss(run.model, data, k, **kw) for k in horizons})
    if lay.n_summary:
        result["recovery"] = recovery_probe(run.model, data, windows=min(windows, 64), seed=seed, device=device)
    if gap_runs is not None:
        losses = []
        for other in gap_runs:
            path = Path(other) / RESULT_FILE
            if not path.is_file():
                raise SoftarError(f"--gap: {other} has no {RESULT_FILE} (a finished training run)")
            losses.append(json.loads(path.read_text())["val_loss"])
        if losses[0] == losses[1]:
            raise SoftarError("--gap: the short and long runs have the same val loss: there is no gap to close")
        result["gap_closed"] = fraction_of_gap(losses[0], metrics["loss"], losses[1])
    if reference is not None:
        ref = load_run(reference, device, data_dir)
        if not ref.model.layout.plain:
            raise SoftarError(f"--reference: {reference} has a context layout; it must be a plain hard-token run")
        result["generation"] = generation_report(run.model, ref.model, data, thresholds, seed=seed)
    return result
