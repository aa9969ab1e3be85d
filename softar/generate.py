"""Generation: hard tokens, or soft tokens that re-enter the context uncollapsed.

Each step the model emits its outputs (`softar.model.Outputs`). In hard mode the next input is E[token]. In soft
mode the next input is the soft token (`Decoding.soft`, any definition in `softar.soft.tokens.SOFT_TOKENS`) and the
token shown is its collapse (`softar.soft.collapse`).

A plain model (no summary or soft slots) sees at most `block_size` slots with a KV cache; when the window is full it
slides by half a window at once, so the cache is refilled once per half window. With `use_cache=False` the same
window is recomputed at every step: the reference the cached path is tested against.

A model with a context layout keeps a `softar.soft.window.ContextState`: each new token enters the soft region, and
the hierarchy moves one step at every token (collapse, evict, merge), so the window is rebuilt and recomputed at
every step. That costs a full window per token, the same at any history length. The collapse policy collapses soft
tokens in place when their out-of-distribution score passes a threshold, and caps how many stay soft.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from softar.config import SoftConfig
from softar.model import Outputs
from softar.soft.collapse import CollapsePolicy, Sampling, collapse
from softar.soft.model import SoftAR
from softar.soft.tokens import add_noise, make_soft_token
from softar.soft.window import ContextState


@dataclass
class Decoding:
    mode: str = "hard"  # hard | soft
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0
    top_p: float = 1.0
    soft: SoftConfig = field(default_factory=SoftConfig)  # soft mode: what re-enters, and its noise
    collapse: str = "nn_l2"  # soft mode: a name in softar.soft.collapse.COLLAPSES, how a soft token is shown
    policy: CollapsePolicy = field(default_factory=CollapsePolicy)  # models with a layout: collapse in place


def next_token(model: SoftAR, out: Outputs, dec: Decoding,
               generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One step's choice from the outputs at the last slot [B, ...]: (vector that re-enters [B, m], id shown [B])."""
    E = model.E
    sampling = Sampling(dec.temperature, dec.top_k, dec.top_p, generator)
    if dec.mode == "hard":
        nxt = sampling.draw(out.logits)
        return E[nxt], nxt
    v = add_noise(dec.soft, make_soft_token(out, E, dec.soft, generator), E, out.logits, generator)
    return v, collapse(dec.collapse, v, out, E, sampling)


LAST = (slice(None), -1)  # index of the last position of [B, T, ...]


@torch.inference_mode()
def generate(model: SoftAR, ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, generator: torch.Generator | None = None, use_cache: bool = True,
             decoding: Decoding | None = None, trace: list | None = None, report: dict | None = None) -> torch.Tensor:
    """ids [B, T0] -> [B, T0 + max_new_tokens]. `decoding` overrides temperature/top_k and chooses soft mode;
    `trace`, if given, receives each step's soft vector [B, m] (hard mode: the embedding fed back). For a model
    with a context layout, `report` receives the final `state`, each step's OOD `scores` [B, N] and which
    generated tokens were collapsed by the policy, `by_policy` [B, N]."""
    dec = decoding or Decoding(temperature=temperature, top_k=top_k or 0)
    if not model.layout.plain:
        return _generate_layout(model, ids, max_new_tokens, dec, generator, trace, report)
    lm, E = model.lm, model.E
    block = model.window_slots
    keep = block // 2
    window = E[ids[:, -block:]]  # [B, T, m]: the slots the model sees
    cache = lm.new_cache(ids.shape[0], block) if use_cache else None
    out = model.outputs(lm.hidden(window, cache=cache)[:, -1:]).at(LAST)
    tokens = [ids]
    for _ in range(max_new_tokens):
        v, nxt = next_token(model, out, dec, generator)
        vec = v.unsqueeze(1)  # [B, 1, m]
        tokens.append(nxt.unsqueeze(-1))
        if trace is not None:
            trace.append(v)
        if window.shape[1] == block:  # full: slide by half a window and refill the cache
            window = torch.cat([window[:, -keep + 1 :], vec], dim=1) if keep > 1 else vec
            if cache is not None:
                cache = lm.new_cache(ids.shape[0], block)
                out = model.outputs(lm.hidden(window, cache=cache)[:, -1:]).at(LAST)
        else:
            window = torch.cat([window, vec], dim=1)
            if cache is not None:
                out = model.outputs(lm.hidden(vec, cache=cache)).at(LAST)
        if cache is None:
            out = model.outputs(lm.hidden(window)[:, -1:]).at(LAST)
    return torch.cat(tokens, dim=1)


def _generate_layout(model: SoftAR, ids: torch.Tensor, max_new_tokens: int, dec: Decoding,
                     generator: torch.Generator | None, trace: list | None, report: dict | None) -> torch.Tensor:
    E = model.E
    B = ids.shape[0]
    state = ContextState(model.layout, B, E.shape[0], E.shape[1], ids.device, E.dtype)
    state.extend_hard(ids)  # the prompt is given text: hard from the start
    new = torch.zeros(B, max_new_tokens, dtype=torch.long, device=ids.device)
    scores = torch.zeros(B, max_new_tokens, device=ids.device)
    by_policy = torch.zeros(B, max_new_tokens, dtype=torch.bool, device=ids.device)
    for g in range(max_new_tokens):
        out = model.read(model.slots(*state.window(E)), last=True).at(LAST)
        v, nxt = next_token(model, out, dec, generator)
        if dec.mode == "hard":
            score, collapsed = torch.zeros(B, device=ids.device), torch.ones(B, dtype=torch.bool, device=ids.device)
        else:
            score = dec.policy.score_of(v, out.logits, nxt, E)
            collapsed = dec.policy.at_entry(score)
        state.push(v, nxt, collapsed, score, E, dec.policy)
        n_soft = state.soft_vec.shape[1]  # the soft region holds the newest generated tokens (none if K = 0)
        by_policy[:, g] = collapsed
        by_policy[:, g + 1 - n_soft : g + 1] |= state.soft_done  # and what the budget collapsed
        new[:, g], scores[:, g] = nxt, score
        if trace is not None:  # what entered the context for this token
            trace.append(torch.where(collapsed[:, None], E[nxt], v))
    if report is not None:
        report.update(state=state, scores=scores, by_policy=by_policy)
    return torch.cat([ids, new], dim=1)
