"""Hard-token generation with a KV cache, temperature, top-k and a seed.

The visible context is at most `block_size` tokens. When it is full, it slides by half a window at once
(keeping the newest `block_size // 2` tokens), so the cache is refilled once per half window instead of being
recomputed at every step. With `use_cache=False` the same window is recomputed from scratch at every step, which
is the reference the cached path is tested against: both give the same tokens.
"""

from __future__ import annotations

import torch

from softar.model import GPT, KVCache


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None,
                generator: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] -> next ids [B, 1]. temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


@torch.inference_mode()
def generate(model: GPT, ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, generator: torch.Generator | None = None,
             use_cache: bool = True) -> torch.Tensor:
    """ids [B, T0] -> [B, T0 + max_new_tokens]."""
    block = model.cfg.block_size
    keep = block // 2
    window = ids[:, -block:]
    cache = KVCache(model.cfg, ids.shape[0], block, ids.device, model.embed.weight.dtype) if use_cache else None
    logits = model(window, cache=cache)[:, -1]
    out = [ids]
    for _ in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_k, generator)
        out.append(nxt)
        if window.shape[1] == block:  # full: slide by half a window and refill the cache
            window = torch.cat([window[:, -keep + 1 :], nxt], dim=1) if keep > 1 else nxt
            if cache is not None:
                cache.reset()
                logits = model(window, cache=cache)[:, -1]
        else:
            window = torch.cat([window, nxt], dim=1)
            if cache is not None:
                logits = model(nxt, cache=cache)[:, -1]
        if cache is None:
            logits = model(window)[:, -1]
    return torch.cat(out, dim=1)
