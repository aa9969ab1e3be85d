"""Soft tokens and their collapse.

A soft token is a vector in the embedding space R^m that can re-enter the context as it is. This module defines
what a soft token is (`soft_token`), the noise that can be put on one (`add_noise`), and the operators that collapse
one to a hard token (`collapse`). Shapes: E [V, m]; logits [..., V]; vectors [..., m]; ids [...].
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

SoftKind = Literal["expected", "regress", "hidden", "gated"]
CollapseKind = Literal["nn_l2", "nn_cos", "sample_sim", "lm_argmax", "lm_sample", "head"]
NoiseKind = Literal["none", "gaussian", "dirichlet", "gumbel"]
OodScore = Literal["none", "entropy", "l2r", "nn_dist"]


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Keep the top-k and/or the smallest set of tokens with probability >= top_p; the rest get -inf."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # tokens after the nucleus is complete
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def expected_embedding(logits: torch.Tensor, E: torch.Tensor, top_k: int = 0, temperature: float = 1.0) -> torch.Tensor:
    """sum_i p_i e_i under softmax(logits / T), optionally over the top-k renormalised (Soft Thinking)."""
    p = filter_logits(logits / temperature, top_k).softmax(-1)
    return p @ E


def entropy(logits: torch.Tensor) -> torch.Tensor:
    logp = logits.log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


def gated_embedding(logits: torch.Tensor, E: torch.Tensor, generator: torch.Generator | None = None,
                    top_k: int = 0) -> torch.Tensor:
    """An entropy-weighted mix (as in Mixture of Inputs): w * expected + (1 - w) * E[sampled], with w the entropy
    normalised by log V. A confident step is nearly its sampled token; an uncertain one keeps the blend."""
    w = (entropy(logits) / math.log(logits.shape[-1])).unsqueeze(-1)
    sampled = sample_ids(logits, generator)
    return w * expected_embedding(logits, E, top_k) + (1 - w) * E[sampled]


def sample_ids(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One id per row of logits [..., V] (rows with -inf entries allowed)."""
    flat = logits.reshape(-1, logits.shape[-1]).float().softmax(-1)
    return torch.multinomial(flat, 1, generator=generator).view(logits.shape[:-1])


def soft_token(kind: SoftKind, E: torch.Tensor, logits: torch.Tensor | None = None,
               y: torch.Tensor | None = None, h_m: torch.Tensor | None = None, top_k: int = 0,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """What re-enters the context: `expected` (p @ E), `regress` (the vector head's y), `hidden` (the last hidden
    state mapped to R^m, as in Coconut), or `gated` (entropy-gated expected/sampled mix)."""
    if kind == "expected":
        return expected_embedding(logits, E, top_k)
    if kind == "gated":
        return gated_embedding(logits, E, generator, top_k)
    if kind == "regress":
        if y is None:
            raise ValueError("soft token 'regress' needs a model with a vector head (model.vector_head = true)")
        return y
    if kind == "hidden":
        return h_m
    raise ValueError(f"unknown soft token kind {kind!r}")


def add_noise(kind: NoiseKind, scale: float, v: torch.Tensor, E: torch.Tensor, logits: torch.Tensor | None = None,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """Noise on soft inputs: Gaussian on the vector (scale = std relative to E's mean row norm), or on the
    distribution behind an expected token: Dirichlet(p / scale) resampling, or Gumbel-perturbed logits."""
    if kind == "none" or scale == 0:
        return v
    if kind == "gaussian":
        rms = E.norm(dim=-1).mean() / math.sqrt(E.shape[-1])
        noise = torch.randn(v.shape, generator=generator, device=v.device, dtype=v.dtype)
        return v + scale * rms * noise
    if logits is None:
        raise ValueError(f"{kind} noise perturbs a distribution: it needs logits")
    if kind == "dirichlet":
        alpha = logits.float().softmax(-1) / scale + 1e-6  # mean p, concentration 1 / scale
        return torch.distributions.Dirichlet(alpha).sample().to(E.dtype) @ E
    if kind == "gumbel":
        u = torch.rand(logits.shape, generator=generator, device=logits.device).clamp_(1e-10, 1 - 1e-10)
        return (logits - scale * torch.log(-torch.log(u))).softmax(-1) @ E
    raise ValueError(f"unknown noise kind {kind!r}")


def similarity(v: torch.Tensor, E: torch.Tensor, metric: Literal["l2", "cos"]) -> torch.Tensor:
    """[..., m] x [V, m] -> [..., V]: larger is closer (negative squared L2, or cosine)."""
    if metric == "cos":
        return F.normalize(v, dim=-1) @ F.normalize(E, dim=-1).T
    return -(v.pow(2).sum(-1, keepdim=True) - 2 * v @ E.T + E.pow(2).sum(-1))


def collapse(kind: CollapseKind, E: torch.Tensor, v: torch.Tensor | None = None, logits: torch.Tensor | None = None,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Soft -> hard. `nn_l2` / `nn_cos`: the nearest embedding. `sample_sim`: sample from softmax(cosine / T) with
    top-k/top-p. `lm_argmax` / `lm_sample`: through the LM head's logits. `head`: the learned collapse head's vector
    (passed as v) to its nearest embedding."""
    if kind in ("nn_l2", "head"):
        return similarity(v, E, "l2").argmax(-1)
    if kind == "nn_cos":
        return similarity(v, E, "cos").argmax(-1)
    if kind == "sample_sim":
        return sample_ids(filter_logits(similarity(v, E, "cos") / temperature, top_k, top_p), generator)
    if kind == "lm_argmax":
        return logits.argmax(-1)
    if kind == "lm_sample":
        return sample_ids(filter_logits(logits / temperature, top_k, top_p), generator)
    raise ValueError(f"unknown collapse kind {kind!r}")


def round_trip_gap(v: torch.Tensor, E: torch.Tensor) -> torch.Tensor:
    """l2-r: the distance between a soft vector and the embedding of its nearest-neighbour collapse."""
    return (v - E[collapse("nn_l2", E, v)]).norm(dim=-1)


def ood_score(kind: OodScore, E: torch.Tensor, v: torch.Tensor, logits: torch.Tensor,
              ids: torch.Tensor) -> torch.Tensor:
    """How far out of distribution a soft token v [..., m] is, per token [...]: `entropy` (nats) of the LM
    distribution it came from; `l2r`, the round-trip gap |v - E[ids]| to the token it collapses to by the chosen
    operator; `nn_dist`, the distance to the nearest embedding (equal to l2r when the collapse is nn_l2)."""
    if kind == "entropy":
        return entropy(logits.float())
    if kind == "l2r":
        return (v - E[ids]).norm(dim=-1)
    if kind == "nn_dist":
        return round_trip_gap(v, E)
    if kind == "none":
        return torch.zeros(v.shape[:-1], device=v.device)
    raise ValueError(f"unknown OOD score {kind!r}")
