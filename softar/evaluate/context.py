"""What the context layout's summary slots hold: a passkey probe (can the model use a fact from far back?), a
recovery probe (can the history's tokens be read back out of a slot by embedding arithmetic?), and the fraction of
the gap between a short and a long window that the slots close."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from softar.data.dataset import random_windows
from softar.soft.model import SoftAR
from softar.soft.window import normalize, summary_weights


@torch.no_grad()
def last_hard_logits(model: SoftAR, seq: torch.Tensor) -> torch.Tensor:
    """The model's prediction after the last token of seq [B, L], read from the last hard slot: a plain model sees
    the last block_size tokens; a layout model puts the last `hard` tokens in its hard region and the rest in its
    history (the soft region, which would follow, cannot change a causal model's earlier slots). Returns [B, V]."""
    lay = model.layout
    if lay.plain:
        return model(seq[:, -model.window_slots :])[:, -1]
    hist = seq[:, : -lay.hard][:, -lay.history :] if lay.history else seq[:, :0]
    history = (hist, torch.full((seq.shape[0],), hist.shape[1], device=seq.device))
    return model.read(model.window(model.E[seq[:, -lay.hard :]], history), last=True).logits[:, -1]


PASSKEY_DISTANCES = (16, 48, 96, 192, 384)


@torch.no_grad()
def passkey_probe(model: SoftAR, data: np.ndarray, distances: tuple[int, ...] = PASSKEY_DISTANCES,
                  windows: int = 64, seed: int = 0, device: torch.device | str = "cpu") -> dict:
    """A pair (a, x) of random tokens planted N tokens before the end of a stretch of val text that then ends in a:
    does the model say x next? Per distance N: top-1 accuracy, and the mean gain in log p(x) over the same text
    without the plant (0 when the plant is outside everything the model sees)."""
    model.eval()
    lay = model.layout
    length = max(distances) + 2 + (lay.history + lay.hard if not lay.plain else model.window_slots)
    ids = random_windows(data, length, windows, seed, device)
    gen = torch.Generator().manual_seed(seed)
    V = model.E.shape[0]
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
def recovery_probe(model: SoftAR, data: np.ndarray, history_lengths: tuple[int, ...] = RECOVERY_HISTORY,
                   windows: int = 64, seed: int = 0, device: torch.device | str = "cpu") -> dict:
    """How much of the history can be read back out of the summary slots by embedding arithmetic alone: rank the
    vocabulary by cosine to the slot vector and count how many of the distinct tokens the slot holds are among the
    top k, k = their number (recall@k). Per slot kind and history length, with the chance level k / V."""
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
