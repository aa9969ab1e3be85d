"""Free-running generation with soft tokens: how coherent the shown text stays (its perplexity under a plain
reference model), how much it repeats itself, and how much of it re-entered soft, at each collapse threshold."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from softar.config import SoftConfig
from softar.data.dataset import random_windows
from softar.generate import Decoding, generate
from softar.soft.collapse import CollapsePolicy
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


COLLAPSE_THRESHOLDS = (0.0, 1.0, 2.0, 3.0, 4.0, 4.5, 5.0, 5.5, 6.0, float("inf"))  # nats: characters to BPE


@torch.no_grad()
def generation_report(model: SoftAR, reference: SoftAR, data: np.ndarray,
                      thresholds: tuple[float, ...] = COLLAPSE_THRESHOLDS, score: str = "entropy",
                      prompts: int = 8, prompt_len: int = 64, new_tokens: int = 256, seed: int = 0,
                      temperature: float = 0.8, top_k: int = 200) -> list[dict]:
    """Free-running soft generation from val prompts at each collapse threshold: the shown (collapsed) text's
    perplexity under a plain reference run (coherence), its repeated 4-grams, the fraction of tokens the policy
    collapsed in place (1 - that fraction of tokens re-entered soft: nuance), and the OOD score over time
    (means over blocks of 32 steps). Soft tokens are expected embeddings; shown tokens are sampled from the LM head
    (`lm_sample`), so threshold 0 is ordinary sampling."""
    model.eval()
    ids = random_windows(data, prompt_len, prompts, seed, model.E.device)
    rows = []
    for thr in thresholds:
        dec = Decoding(mode="soft", temperature=temperature, top_k=top_k, soft=SoftConfig(kind="expected"),
                       collapse="lm_sample", policy=CollapsePolicy(score=score, threshold=thr))
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
