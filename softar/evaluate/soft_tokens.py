"""What a model's soft outputs are worth: teacher-forced distance to the next token's embedding, BrierLM, and the
open-loop loss when the model reads its own outputs. Read through a plain window and the network's KV cache."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from softar.config import SoftConfig
from softar.data.dataset import random_windows
from softar.generate import LAST, Decoding, next_token
from softar.soft.collapse import nearest, round_trip_gap
from softar.soft.model import SoftAR
from softar.soft.tokens import SOFT_TOKENS, make_soft_token, sample_ids


def soft_kinds(model: SoftAR) -> list[str]:
    """The registered soft-token definitions this model can make."""
    has_y = model.lm.vector_head is not None
    return [name for name, d in SOFT_TOKENS.items() if has_y or not d.needs_vector_head]


@torch.no_grad()
def soft_output_metrics(model: SoftAR, data: np.ndarray, windows: int = 64, seed: int = 0,
                        device: torch.device | str = "cpu") -> dict:
    """Teacher-forced quality of each soft token the model can make against the next token's embedding: l2,
    cosine, nearest-neighbour top-1 and the round-trip gap l2-r; plus the LM head's top-1 for reference."""
    model.eval()
    ids = random_windows(data, model.window_slots + 1, windows, seed, device)
    x, y = ids[:, :-1], ids[:, 1:]
    E = model.E
    out = model.lm.heads(model.lm.hidden(E[x]))
    target = E[y]
    gen = torch.Generator(device=ids.device).manual_seed(seed)
    result = {"lm_top1": (out.logits.argmax(-1) == y).float().mean().item()}
    for kind in soft_kinds(model):
        v = make_soft_token(out, E, SoftConfig(kind=kind), gen)
        result[kind] = {
            "l2": (v - target).norm(dim=-1).mean().item(),
            "cosine": F.cosine_similarity(v, target, dim=-1).mean().item(),
            "nn_top1": (nearest(v, E) == y).float().mean().item(),
            "l2_r": round_trip_gap(v, E).mean().item(),
        }
    return result


FEEDBACK = {"greedy": Decoding(mode="hard", temperature=0), "sampled": Decoding(mode="hard", temperature=1.0)}


def feedback_modes(model: SoftAR) -> list[str]:
    """What an open-loop rollout can feed back: the truth (teacher), collapsed tokens, or each soft token."""
    return ["teacher", *FEEDBACK, *(f"soft_{kind}" for kind in soft_kinds(model))]


@torch.no_grad()
def open_loop_loss(model: SoftAR, data: np.ndarray, horizon: int, modes: list[str] | None = None, windows: int = 64,
                   seed: int = 0, device: torch.device | str = "cpu") -> dict[str, float]:
    """Cross-entropy on the true next `horizon` tokens when, for those steps, the model's inputs are its own outputs
    (soft tokens, or its greedy or sampled collapse) instead of the truth. The prefix fills the rest of the window.
    `teacher` feeds the truth: the teacher-forced loss on the same positions, for reference."""
    model.eval()
    lm, E, block = model.lm, model.E, model.window_slots
    if not 1 <= horizon < block:
        raise ValueError(f"horizon {horizon} must be in [1, block_size={block})")
    prefix = block - horizon
    ids = random_windows(data, block + 1, windows, seed, device)
    truth = ids[:, prefix + 1 :]  # [B, horizon]: the tokens each step must predict
    results = {}
    for mode in modes or feedback_modes(model):
        gen = torch.Generator(device=ids.device).manual_seed(seed)
        cache = lm.new_cache(ids.shape[0], block)
        out = lm.heads(lm.hidden(E[ids[:, : prefix + 1]], cache=cache)[:, -1:]).at(LAST)
        losses = []
        for k in range(horizon):
            losses.append(F.cross_entropy(out.logits.float(), truth[:, k]))
            if k == horizon - 1:
                break
            if mode == "teacher":
                vec = E[truth[:, k]]
            else:  # the same step choice generation makes
                dec = FEEDBACK.get(mode) or Decoding(mode="soft", soft=SoftConfig(kind=mode.removeprefix("soft_")))
                vec = next_token(model, out, dec, gen)[0]
            out = lm.heads(lm.hidden(vec.unsqueeze(1), cache=cache)).at(LAST)
        results[mode] = torch.stack(losses).mean().item()
    return results


@torch.no_grad()
def brier_lm(model: SoftAR, data: np.ndarray, windows: int = 64, seed: int = 0, max_n: int = 4,
             device: torch.device | str = "cpu") -> dict[str, float]:
    """BrierLM (CALM): from the true prefix draw two independent n-token continuations x1, x2 from the model; the
    unbiased Brier-n estimate is 1[x1 = y] + 1[x2 = y] - 1[x1 = x2] for the true n-gram y. BrierLM is 100 times the
    geometric mean of Brier-1..4. Samples come from the LM head at temperature 1, the same way for every model."""
    model.eval()
    lm, E, block = model.lm, model.E, model.window_slots
    prefix = block - max_n
    ids = random_windows(data, block + 1, windows, seed, device)
    truth = ids[:, prefix + 1 : prefix + 1 + max_n]
    gen = torch.Generator(device=ids.device).manual_seed(seed)
    draws = []
    for _ in range(2):
        cache = lm.new_cache(ids.shape[0], block)
        logits = lm.heads(lm.hidden(E[ids[:, : prefix + 1]], cache=cache)[:, -1:]).logits[:, -1]
        seq = []
        for k in range(max_n):
            tok = sample_ids(logits, gen)
            seq.append(tok)
            if k < max_n - 1:
                logits = lm.heads(lm.hidden(E[tok].unsqueeze(1), cache=cache)).logits[:, -1]
        draws.append(torch.stack(seq, dim=1))
    x1, x2 = draws
    result = {}
    for n in range(1, max_n + 1):
        hit1, hit2, agree = ((a[:, :n] == b[:, :n]).all(-1).float() for a, b in ((x1, truth), (x2, truth), (x1, x2)))
        result[f"brier{n}"] = (hit1 + hit2 - agree).mean().item()
    product = math.prod(max(result[f"brier{n}"], 0.0) for n in range(1, max_n + 1))
    result["brierlm"] = 100 * product ** (1 / max_n)
    return result
