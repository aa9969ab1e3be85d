"""Collapse: soft vector -> hard token, how far out of distribution a soft token is, and when to collapse one.

Operators (`COLLAPSES`) turn a soft token v [..., m] into ids [...]; scores (`OOD_SCORES`) say per token how far it
has drifted; `CollapsePolicy` decides which soft tokens to collapse in place: those whose score passes a threshold,
and the highest-scoring ones beyond a budget. Shapes: E [V, m]; logits [..., V].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from softar.model.interface import Outputs
from softar.soft.tokens import Generator, entropy, filter_logits, sample_ids


def similarity(v: torch.Tensor, E: torch.Tensor, metric: Literal["l2", "cos"]) -> torch.Tensor:
    """[..., m] x [V, m] -> [..., V]: larger is closer (negative squared L2, or cosine)."""
    if metric == "cos":
        return F.normalize(v, dim=-1) @ F.normalize(E, dim=-1).T
    return -(v.pow(2).sum(-1, keepdim=True) - 2 * v @ E.T + E.pow(2).sum(-1))


def nearest(v: torch.Tensor, E: torch.Tensor) -> torch.Tensor:
    return similarity(v, E, "l2").argmax(-1)


def nearest_k(v: torch.Tensor, E: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k nearest embeddings to v [..., m] by L2: (distances [..., k], ids [..., k]), nearest first."""
    d = (-similarity(v, E, "l2")).clamp_min(0).sqrt()
    near = d.topk(min(k, E.shape[0]), largest=False)
    return near.values, near.indices


@dataclass(frozen=True)
class Sampling:
    """How a stochastic operator draws: temperature (0: greedy), top-k (0: all), top-p (1: all)."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    generator: Generator = None

    def draw(self, logits: torch.Tensor) -> torch.Tensor:
        if self.temperature == 0:
            return logits.argmax(-1)
        return sample_ids(filter_logits(logits.float() / self.temperature, self.top_k, self.top_p), self.generator)


@dataclass(frozen=True)
class Entry:
    """A registered operator or score: the function, what it is, and the optional model head it needs."""

    fn: Callable
    doc: str
    needs_head: str = ""  # "collapse_head" or "vector_head"


def _sampled(s: Sampling) -> Sampling:
    return Sampling(max(s.temperature, 1e-6), s.top_k, s.top_p, s.generator)


# operator(v, out, E, sampling) -> ids; `out` holds the logits and the collapse head's vector for the same position
COLLAPSES: dict[str, Entry] = {
    "nn_l2": Entry(lambda v, out, E, s: nearest(v, E), "the nearest embedding (L2)"),
    "nn_cos": Entry(lambda v, out, E, s: similarity(v, E, "cos").argmax(-1), "the most cosine-similar embedding"),
    "sample_sim": Entry(lambda v, out, E, s: _sampled(s).draw(similarity(v, E, "cos")),
                        "a sample from softmax(cosine / temperature), with top-k / top-p"),
    "lm_argmax": Entry(lambda v, out, E, s: out.logits.argmax(-1), "the LM head's most likely token"),
    "lm_sample": Entry(lambda v, out, E, s: _sampled(s).draw(out.logits),
                       "a sample from the LM head (temperature, top-k, top-p)"),
    "head": Entry(lambda v, out, E, s: nearest(out.c, E),
                  "the learned collapse head's vector, to its nearest embedding", "collapse_head"),
}


def collapse(kind: str, v: torch.Tensor, out: Outputs, E: torch.Tensor,
             sampling: Sampling | None = None) -> torch.Tensor:
    """Soft token v [..., m] (with the outputs it came from) -> ids [...] by the operator `kind`."""
    op = COLLAPSES[kind]
    if op.needs_head == "collapse_head" and out.c is None:
        raise ValueError(f"collapse {kind!r} needs a model with a collapse head (model.collapse_head = true)")
    return op.fn(v, out, E, sampling or Sampling())


def round_trip_gap(v: torch.Tensor, E: torch.Tensor) -> torch.Tensor:
    """l2-r: the distance between a soft vector and the embedding of its nearest-neighbour collapse."""
    return (v - E[nearest(v, E)]).norm(dim=-1)


# score(v, logits, ids, E) -> [...]
OOD_SCORES: dict[str, Entry] = {
    "none": Entry(lambda v, logits, ids, E: torch.zeros(v.shape[:-1], device=v.device), "always 0"),
    "entropy": Entry(lambda v, logits, ids, E: entropy(logits.float()),
                     "the entropy (nats) of the distribution the soft token came from"),
    "l2r": Entry(lambda v, logits, ids, E: (v - E[ids]).norm(dim=-1), "the distance to the token it collapses to"),
    "nn_dist": Entry(lambda v, logits, ids, E: round_trip_gap(v, E), "the distance to the nearest embedding"),
}


def budget_collapse(scores: torch.Tensor, done: torch.Tensor, budget: int) -> torch.Tensor:
    """Which soft tokens to collapse now [B, n] so that at most `budget` stay uncollapsed: the uncollapsed ones
    with the highest OOD scores go first (ties: the oldest first)."""
    key = torch.where(done, float("-inf"), scores.float())
    order = torch.sort(key, dim=1, descending=True, stable=True).indices  # ties: the oldest first
    rank = order.argsort(dim=1)  # 0 = collapse first
    excess = ((~done).sum(1, keepdim=True) - budget).clamp_min(0)
    return (rank < excess) & ~done


@dataclass(frozen=True)
class CollapsePolicy:
    """Collapse a soft token in place when its OOD `score` is above `threshold`, and keep at most `budget` soft
    tokens uncollapsed (-1: no cap beyond the soft region). `keep_uncertain` turns the rule round: the tokens whose
    score is *below* the threshold collapse (the confident ones, where soft and hard agree anyway), the uncertain
    ones stay soft, and the budget collapses the lowest scores first."""

    score: str = "entropy"
    threshold: float = float("inf")
    budget: int = -1
    keep_uncertain: bool = False

    def score_of(self, v: torch.Tensor, logits: torch.Tensor, ids: torch.Tensor, E: torch.Tensor) -> torch.Tensor:
        return OOD_SCORES[self.score].fn(v, logits, ids, E)

    def at_entry(self, scores: torch.Tensor) -> torch.Tensor:
        """[B]: which new soft tokens collapse as they enter."""
        return scores < self.threshold if self.keep_uncertain else scores > self.threshold

    def over_budget(self, scores: torch.Tensor, done: torch.Tensor) -> torch.Tensor:
        """[B, n]: which of the soft region's tokens to collapse now to keep within the budget."""
        if self.budget < 0:
            return torch.zeros_like(done)
        return budget_collapse(-scores if self.keep_uncertain else scores, done, self.budget)
