"""What the context layout's summary slots hold by embedding arithmetic alone: the recovery probe (can the history's
tokens be read back out of a slot?), against the frequency prior. What the model makes of them is measured on
identical targets by `softar.evaluate.retention`."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from softar.data.dataset import random_windows
from softar.soft.model import SoftAR
from softar.soft.window import normalize, summary_weights

RECOVERY_HISTORY = (64, 128, 256, 512)


@torch.no_grad()
def recovery_probe(model: SoftAR, data: np.ndarray, prior: torch.Tensor,
                   history_lengths: tuple[int, ...] = RECOVERY_HISTORY, windows: int = 64, seed: int = 0,
                   device: torch.device | str = "cpu") -> dict:
    """How much of the history can be read back out of the summary slots by embedding arithmetic alone: rank the
    vocabulary by cosine to the slot vector and count how many of the distinct tokens the slot holds are among the
    top k, k = their number (recall@k). Per slot kind and history length, with the chance level k / V and the null
    that matters: the same recall for the ranking by `prior` [V] (train-split frequencies, `token_frequencies`),
    which never looks at the history. Cosine ranking is blind to a slot's scale, so sum, mean and sqrt read back
    alike by construction."""
    model.eval()
    lay, E = model.layout, model.E
    if not lay.n_summary:
        return {}
    En = F.normalize(E.float(), dim=-1)
    kinds = ["aggregate"] * lay.aggregate + ["segment"] * len(lay.segments)
    result = {}
    for n in history_lengths:
        hist = random_windows(data, n, windows, seed, device)
        W, counts = summary_weights(hist, torch.full((windows,), n, device=hist.device), lay, E.shape[0])
        slots = normalize(W, counts, lay.op) @ E.float()  # [B, s, m]
        sims = F.normalize(slots, dim=-1) @ En.T  # [B, s, V]
        held = W > 0
        k = held.sum(-1)  # distinct tokens per slot
        recall = recall_at_k(sims, held)
        base = recall_at_k(prior.to(sims.device, sims.dtype).expand_as(sims), held)
        cell = {}
        for kind in dict.fromkeys(kinds):
            cols = [i for i, kd in enumerate(kinds) if kd == kind]
            r, p, kk = recall[:, cols], base[:, cols], k[:, cols].float()
            if torch.isnan(r).all():
                continue
            cell[kind] = {"recall_at_k": r.nanmean().item(), "prior_recall_at_k": p.nanmean().item(),
                          "recall_minus_prior": (r - p).nanmean().item(), "k": kk[kk > 0].mean().item(),
                          "chance": (kk[kk > 0] / E.shape[0]).mean().item()}
        result[str(n)] = cell
    return result


def recall_at_k(scores: torch.Tensor, held: torch.Tensor) -> torch.Tensor:
    """scores [..., V] rank the vocabulary; held [..., V] marks the k tokens a slot holds -> the fraction of them
    among the top k [...] (NaN where k = 0). Ties break by token id, so a constant score ranks like no score."""
    k = held.sum(-1)
    order = scores.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)  # rank of each token
    hits = (held & (order < k.unsqueeze(-1))).sum(-1)
    return torch.where(k > 0, hits / k.clamp_min(1), torch.nan)


def token_frequencies(data: np.ndarray, vocab_size: int) -> torch.Tensor:
    """Each token's count in a split [V]: the frequency prior."""
    return torch.from_numpy(np.bincount(np.asarray(data), minlength=vocab_size)[:vocab_size].astype(np.float64))
