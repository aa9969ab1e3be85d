"""Slots the model fills itself: continuous thoughts, and the soft region's rollout in training.

`fill_slots` is the one loop that runs a sequence whose slots [start, start + n) the model fills with what a feed
makes of its outputs at the slot before (`softar.soft.feeds`): one step over the slots before them, one per filled
slot, one over the rest, all through one KV cache. The autograd graph runs through every filled slot, so a loss on
what follows them trains what each holds, as in Coconut. Training (Coconut's curriculum, the soft region's rollout),
RL's replay and the decoder's prefill (`softar.decode`) all run it.

A reasoning task's thoughts are its <thought> slots, each filled with the soft token `soft.kind` of the position
just before it: kind "hidden" is Coconut's fed-back last hidden state; "expected", "gated", "moi", ... are softAR's
own, with `soft.noise` in training. A batch's thought slots sit at the same positions
(`softar.tasks.data.TaskSampler` groups questions by length), so one step per thought serves the whole batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from softar.model import Outputs
from softar.soft.feeds import SoftFeed

Fill = Callable[[Outputs, int], torch.Tensor]  # (outputs at the slot before [B, 1, ...], slot t) -> [B, 1, m]


def fill_slots(model, vectors: torch.Tensor, start: int, n: int, fill: Fill | None, cache=None, last: bool = False,
               encode: Callable[[torch.Tensor], torch.Tensor] | None = None,
               read_last_fill: bool = True) -> tuple[Outputs, torch.Tensor]:
    """Slot vectors [B, L, m] whose slots start .. start + n - 1 the model fills: each with `fill(outputs at the
    slot before, t)`, entering the window as `encode(vector)` (default as it is). Every step goes through `cache`
    (a fresh one if None), which holds the whole sequence afterwards. -> (the outputs at every position [B, L, ...],
    or with `last` at the last one [B, 1, ...]; the filled vectors [B, n, m]). `read_last_fill=False` leaves the
    last filled slot unread when nothing follows it (its outputs are then not returned)."""
    B, L, _ = vectors.shape
    at = slice(-1, None) if last else None
    if n == 0 and cache is None:
        return model.step(vectors, at=at), vectors[:, :0]
    if n and start == 0:
        raise ValueError("a filled slot needs a position before it")
    cache = cache if cache is not None else model.new_cache(B, L)
    pieces = [model.step(vectors[:, :start], cache, at=at)] if start else []
    filled = []
    for t in range(n):
        filled.append(fill(pieces[-1].at((slice(None), slice(-1, None))), t))
        if t < n - 1 or read_last_fill or start + n < L:
            pieces.append(model.step(encode(filled[-1]) if encode else filled[-1], cache, at=at))
    if start + n < L:
        pieces.append(model.step(vectors[:, start + n :], cache, at=at))
    out = pieces[-1] if last else Outputs.cat(pieces, dim=1)
    return out, torch.cat(filled, dim=1) if filled else vectors[:, :0]


def thought_span(ids: torch.Tensor, thought_id: int | None) -> tuple[int, int]:
    """(first slot, count) of the thought slots of ids [B, L], the same in every row; (0, 0) without any."""
    if thought_id is None:
        return 0, 0
    mask = ids == thought_id
    n = int(mask[0].sum())
    if n == 0 and not mask.any():
        return 0, 0
    start = int(mask[0].int().argmax())
    if not (mask[:, start : start + n].all() and int(mask.sum()) == n * ids.shape[0]):
        raise ValueError("thought slots must be one run at the same positions in every row")
    return start, n


def forward_thoughts(model, ids: torch.Tensor, fill: Fill | None = None, cache=None,
                     prompt_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [B, L] whose <thought> slots (among the first `prompt_len`, default all) the model fills (`fill`;
    default the model's continuous thoughts, `SoftFeed.thoughts`) -> (logits [B, L, V], thoughts [B, n, m])."""
    vectors = F.embedding(ids, model.E)  # [B, L, m]
    start, n = thought_span(ids[:, :prompt_len], model.thought_id)
    fill = fill or SoftFeed.thoughts(model).filler(model, dtype=vectors.dtype)
    out, thoughts = fill_slots(model, vectors, start, n, fill, cache)
    return out.logits, thoughts


def task_loss(model, ids: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Cross-entropy over the targets that are not -1 (what follows <eot>): (loss, {"ce": loss})."""
    logits, _ = forward_thoughts(model, ids)
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1)
    return loss, {"ce": loss}
