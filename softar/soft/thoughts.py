"""Continuous thoughts: slots of a task sequence (the <thought> token) that the model fills itself, each with the soft
token `soft.kind` of the position just before it, fed back without becoming a token. Kind "hidden" is Coconut's
fed-back last hidden state; "expected", "gated", "moi", ... are softAR's own definitions, with `soft.noise` in
training.

A batch's thought slots sit at the same positions (`softar.tasks.data.TaskSampler` groups questions by length), so
one forward through the KV cache per thought serves the whole batch. The autograd graph runs through every thought,
so the loss on what follows them trains what each thought holds, as in Coconut."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from softar.model import KVCache, Outputs
from softar.soft.tokens import Generator, add_noise, make_soft_token


def thought(model, out: Outputs, generator: Generator = None) -> torch.Tensor:
    """The thought that follows outputs `out` [B, 1, ...]: the soft token, with noise in training -> [B, 1, m]."""
    v = make_soft_token(out, model.E, model.soft_spec, generator)
    if model.training:
        v = add_noise(model.soft_spec, v, model.E, out.logits, generator)
    return v


def thought_span(ids: torch.Tensor, thought_id: int) -> tuple[int, int]:
    """(first slot, count) of the thought slots of ids [B, L], the same in every row; (0, 0) without any."""
    mask = ids == thought_id
    n = int(mask[0].sum())
    if n == 0 and not mask.any():
        return 0, 0
    start = int(mask[0].int().argmax())
    if not (mask[:, start : start + n].all() and int(mask.sum()) == n * ids.shape[0]):
        raise ValueError("thought slots must be one run at the same positions in every row")
    return start, n


def forward_thoughts(model, ids: torch.Tensor, cache: KVCache | None = None,
                     generator: Generator = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [B, L] whose <thought> slots the model fills -> (logits [B, L, V], thoughts [B, n, m]): one forward
    for the slots before the thoughts, one per thought, one for the rest; all through `cache` (a fresh one if None),
    which holds the whole sequence afterwards."""
    lm, E = model.lm, model.E
    vectors = F.embedding(ids, E)  # [B, L, m]
    start, n = thought_span(ids, model.thought_id)
    if n == 0 and cache is None:
        return model.outputs(lm.hidden(vectors)).logits, vectors[:, :0]
    if n and start == 0:
        raise ValueError("a thought slot needs a position before it")
    cache = cache if cache is not None else lm.new_cache(*ids.shape)
    pieces = [model.outputs(lm.hidden(vectors[:, :start], cache=cache))] if start else []
    thoughts = []
    for _ in range(n):
        thoughts.append(thought(model, pieces[-1].at((slice(None), slice(-1, None))), generator).to(vectors.dtype))
        pieces.append(model.outputs(lm.hidden(thoughts[-1], cache=cache)))
    if start + n < ids.shape[1]:
        pieces.append(model.outputs(lm.hidden(vectors[:, start + n :], cache=cache)))
    logits = torch.cat([p.logits for p in pieces], dim=1)
    return logits, torch.cat(thoughts, dim=1) if thoughts else vectors[:, :0]


def task_loss(model, ids: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Cross-entropy over the targets that are not -1 (what follows <eot>): (loss, {"ce": loss})."""
    logits, _ = forward_thoughts(model, ids)
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1)
    return loss, {"ce": loss}
