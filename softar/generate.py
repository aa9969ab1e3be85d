"""Generation: hard tokens, or soft tokens that re-enter the context uncollapsed.

Each step the model emits logits (and, if it has them, a vector-head y and a collapse-head c). In hard mode the next
input is E[token]. In soft mode the next input is the soft token (see `softar.collapse.soft_token`) and the token
shown is its collapse.

A plain model (no summary or soft slots) sees at most `block_size` slots with a KV cache; when the window is full it
slides by half a window at once, so the cache is refilled once per half window. With `use_cache=False` the same
window is recomputed at every step: the reference the cached path is tested against.

A model with a context layout keeps a `softar.context.ContextState`: each new token enters the soft region, and the
hierarchy moves one step at every token (collapse, evict, merge), so the window is rebuilt and recomputed at every
step. That costs a full window per token, the same at any history length. Soft tokens can also be collapsed in place
by an out-of-distribution score over a threshold, and a budget caps how many stay soft.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from softar.collapse import (
    CollapseKind,
    NoiseKind,
    OodScore,
    SoftKind,
    add_noise,
    collapse,
    filter_logits,
    ood_score,
    sample_ids,
    soft_token,
)
from softar.context import ContextState
from softar.model import GPT, KVCache


@dataclass
class Decoding:
    mode: str = "hard"  # hard | soft (gated is soft with soft_kind = "gated")
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0
    top_p: float = 1.0
    soft_kind: SoftKind = "expected"
    soft_top_k: int = 0
    collapse_kind: CollapseKind = "nn_l2"
    noise: NoiseKind = "none"  # on the soft token before it re-enters
    noise_scale: float = 0.0
    # collapse policy (models with a context layout): collapse a soft token in place when its OOD score is above
    # the threshold, and keep at most soft_budget soft tokens uncollapsed (-1: no cap beyond the soft region)
    collapse_score: OodScore = "entropy"
    collapse_threshold: float = float("inf")
    soft_budget: int = -1


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None,
                generator: torch.Generator | None, top_p: float = 1.0) -> torch.Tensor:
    """logits [B, V] -> next ids [B, 1]. temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    return sample_ids(filter_logits(logits.float() / temperature, top_k or 0, top_p), generator).unsqueeze(-1)


def next_token(model: GPT, out: dict, dec: Decoding, generator: torch.Generator | None):
    """One step's choice from the model's outputs at the last slot: (vector that re-enters [B, m], id shown [B])."""
    E = model.embed.weight
    logits = out["logits"][:, -1]
    if dec.mode == "hard":
        nxt = sample_next(logits, dec.temperature, dec.top_k, generator, dec.top_p)[:, 0]
        return E[nxt], nxt
    y = out["y"][:, -1] if "y" in out else None
    v = soft_token(dec.soft_kind, E, logits, y, out["h_m"][:, -1], dec.soft_top_k, generator)
    v = add_noise(dec.noise, dec.noise_scale, v, E, logits, generator)
    shown = out["c"][:, -1] if dec.collapse_kind == "head" else v
    nxt = collapse(dec.collapse_kind, E, shown, logits, max(dec.temperature, 1e-6), dec.top_k, dec.top_p, generator)
    return v, nxt


@torch.inference_mode()
def generate(model: GPT, ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, generator: torch.Generator | None = None, use_cache: bool = True,
             decoding: Decoding | None = None, trace: list | None = None, report: dict | None = None) -> torch.Tensor:
    """ids [B, T0] -> [B, T0 + max_new_tokens]. `decoding` overrides temperature/top_k and chooses soft mode;
    `trace`, if given, receives each step's soft vector [B, m] (hard mode: the embedding fed back). For a model
    with a context layout, `report` receives the final `state`, each step's OOD `scores` [B, N] and which
    generated tokens were collapsed by the policy, `by_policy` [B, N]."""
    dec = decoding or Decoding(temperature=temperature, top_k=top_k or 0)
    if not model.layout.plain:
        return _generate_layout(model, ids, max_new_tokens, dec, generator, trace, report)
    E = model.embed.weight
    block = model.cfg.block_size
    keep = block // 2
    window = model.embed(ids[:, -block:])  # [B, T, m]: the slots the model sees
    cache = KVCache(model.cfg, ids.shape[0], block, ids.device, E.dtype) if use_cache else None
    out = model.heads(model.hidden(window, cache=cache)[:, -1:])
    tokens = [ids]
    for _ in range(max_new_tokens):
        v, nxt = next_token(model, out, dec, generator)
        nxt, vec = nxt.unsqueeze(-1), v.unsqueeze(1)  # [B, 1], [B, 1, m]
        tokens.append(nxt)
        if trace is not None:
            trace.append(vec[:, 0])
        if window.shape[1] == block:  # full: slide by half a window and refill the cache
            window = torch.cat([window[:, -keep + 1 :], vec], dim=1) if keep > 1 else vec
            if cache is not None:
                cache.reset()
                out = model.heads(model.hidden(window, cache=cache)[:, -1:])
        else:
            window = torch.cat([window, vec], dim=1)
            if cache is not None:
                out = model.heads(model.hidden(vec, cache=cache))
        if cache is None:
            out = model.heads(model.hidden(window)[:, -1:])
    return torch.cat(tokens, dim=1)


def _generate_layout(model: GPT, ids: torch.Tensor, max_new_tokens: int, dec: Decoding,
                     generator: torch.Generator | None, trace: list | None, report: dict | None) -> torch.Tensor:
    E = model.embed.weight
    B = ids.shape[0]
    state = ContextState(model.layout, B, E.shape[0], E.shape[1], ids.device, E.dtype)
    state.extend_hard(ids)  # the prompt is given text: hard from the start
    budget = None if dec.soft_budget < 0 else dec.soft_budget
    new = torch.zeros(B, max_new_tokens, dtype=torch.long, device=ids.device)
    scores = torch.zeros(B, max_new_tokens, device=ids.device)
    by_policy = torch.zeros(B, max_new_tokens, dtype=torch.bool, device=ids.device)
    for g in range(max_new_tokens):
        summary, tokens, n_soft = state.window(E)
        out = model.heads(model.hidden(model.slots(summary, tokens, n_soft))[:, -1:])
        v, nxt = next_token(model, out, dec, generator)
        if dec.mode == "hard":
            score, collapsed = torch.zeros(B, device=ids.device), torch.ones(B, dtype=torch.bool, device=ids.device)
        else:
            score = ood_score(dec.collapse_score, E, v, out["logits"][:, -1], nxt)
            collapsed = score > dec.collapse_threshold
        state.push(v, nxt, collapsed, score, E, budget)
        n_soft = state.soft_vec.shape[1]  # the soft region holds the newest generated tokens (none if K = 0)
        by_policy[:, g] = collapsed
        by_policy[:, g + 1 - n_soft : g + 1] |= state.soft_done  # and what the budget collapsed
        new[:, g], scores[:, g] = nxt, score
        if trace is not None:  # what entered the context for this token
            trace.append(torch.where(collapsed[:, None], E[nxt], v))
    if report is not None:
        report.update(state=state, scores=scores, by_policy=by_policy)
    return torch.cat([ids, new], dim=1)
