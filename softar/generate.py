"""Generation with a KV cache: hard tokens, or soft tokens that re-enter the context uncollapsed.

Each step the model emits logits (and, if it has them, a vector-head y and a collapse-head c). In hard mode the next
input is E[token]. In soft mode the next input is the soft token (see `softar.collapse.soft_token`) and the token
shown is its collapse. The visible context is at most `block_size` slots; when it is full it slides by half a window
at once, so the cache is refilled once per half window. With `use_cache=False` the same window is recomputed at every
step: the reference the cached path is tested against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from softar.collapse import (
    CollapseKind,
    NoiseKind,
    SoftKind,
    add_noise,
    collapse,
    filter_logits,
    sample_ids,
    soft_token,
)
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


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None,
                generator: torch.Generator | None, top_p: float = 1.0) -> torch.Tensor:
    """logits [B, V] -> next ids [B, 1]. temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    return sample_ids(filter_logits(logits.float() / temperature, top_k or 0, top_p), generator).unsqueeze(-1)


@torch.inference_mode()
def generate(model: GPT, ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, generator: torch.Generator | None = None, use_cache: bool = True,
             decoding: Decoding | None = None, trace: list | None = None) -> torch.Tensor:
    """ids [B, T0] -> [B, T0 + max_new_tokens]. `decoding` overrides temperature/top_k and chooses soft mode;
    `trace`, if given, receives each step's soft vector [B, m] (hard mode: the embedding fed back)."""
    dec = decoding or Decoding(temperature=temperature, top_k=top_k or 0)
    E = model.embed.weight
    block = model.cfg.block_size
    keep = block // 2
    window = model.embed(ids[:, -block:])  # [B, T, m]: the slots the model sees
    cache = KVCache(model.cfg, ids.shape[0], block, ids.device, E.dtype) if use_cache else None
    out = model.heads(model.hidden(window, cache=cache)[:, -1:])
    tokens = [ids]
    for _ in range(max_new_tokens):
        logits = out["logits"][:, -1]
        if dec.mode == "hard":
            nxt = sample_next(logits, dec.temperature, dec.top_k, generator, dec.top_p)
            vec = E[nxt]  # [B, 1, m]
        else:
            y = out["y"][:, -1] if "y" in out else None
            v = soft_token(dec.soft_kind, E, logits, y, out["h_m"][:, -1], dec.soft_top_k, generator)
            v = add_noise(dec.noise, dec.noise_scale, v, E, logits, generator)
            shown = out["c"][:, -1] if dec.collapse_kind == "head" else v
            nxt = collapse(dec.collapse_kind, E, shown, logits, max(dec.temperature, 1e-6), dec.top_k, dec.top_p,
                           generator).unsqueeze(-1)
            vec = v.unsqueeze(1)
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
