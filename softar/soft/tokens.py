"""Soft tokens: the vectors in R^m that re-enter the context uncollapsed, and the noise that can be put on them.

Each definition is one registry entry: a function of the model's outputs at a position (`softar.model.Outputs`) and
the embedding table E [V, m], returning a vector [..., m]. Training, decoding, evaluation and the CLI's choices all
read `SOFT_TOKENS`, so a new definition is one decorated function here (and its test):

    @soft_token("mine", params={"alpha": 0.5})
    def mine(out, E, spec, generator):
        ...
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from softar import SoftarError
from softar.model.interface import Outputs


@dataclass(frozen=True)
class SoftTokenDef:
    name: str
    fn: Callable  # (out: Outputs, E, spec: SoftConfig, generator) -> [..., m]
    doc: str
    params: dict[str, float] = field(default_factory=dict)  # parameter -> default (config: soft.args)
    needs_head: str = ""  # the optional model head it reads: "vector_head" or "collapse_head"
    samples: bool = False  # it draws a token (from `generator`): the same outputs can give different vectors


SOFT_TOKENS: dict[str, SoftTokenDef] = {}


HEADS = ("vector_head", "collapse_head")  # a model's optional heads (`softar.model.Outputs.y`, `.c`)


def heads_of(obj) -> set[str]:
    """The optional heads a `ModelConfig` asks for, or a `VectorLM` has."""
    return {h for h in HEADS if getattr(obj, h, None) not in (None, False)}


def soft_token(name: str, params: dict[str, float] | None = None, needs_head: str = "", samples: bool = False):
    """Register a soft-token definition under `name`."""

    def register(fn: Callable) -> Callable:
        doc = " ".join((fn.__doc__ or "").strip().split("\n\n")[0].split())  # the first paragraph, on one line
        SOFT_TOKENS[name] = SoftTokenDef(name, fn, doc, dict(params or {}), needs_head, samples)
        return fn

    return register


# -- distributions over the vocabulary ------------------------------------------------------------------------------
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


class RowGenerators:
    """One random stream per sequence of a batch: row i draws only from `torch.Generator` seeded seeds[i], so what a
    sequence draws does not depend on which other sequences share its batch, or on when they finish. Accepted
    wherever a `generator` is (sampling, soft tokens, noise); `select` follows the batch as it shrinks."""

    def __init__(self, seeds: list[int], device: torch.device | str = "cpu"):
        self.gens = [torch.Generator(device).manual_seed(s) for s in seeds]
        self.device = torch.device(device)

    def __len__(self) -> int:
        return len(self.gens)

    def rand(self, shape: tuple[int, ...] = ()) -> torch.Tensor:
        """[R, *shape] uniforms in [0, 1), row i from stream i."""
        return torch.stack([torch.rand(shape, generator=g, device=self.device) for g in self.gens])

    def randn(self, shape: tuple[int, ...] = ()) -> torch.Tensor:
        return torch.stack([torch.randn(shape, generator=g, device=self.device) for g in self.gens])

    def select(self, rows: list[int]) -> None:
        self.gens = [self.gens[i] for i in rows]

    def part(self, start: int, end: int) -> RowGenerators:
        """The streams of rows [start, end), shared with this object (what one part of a batch draws)."""
        view = RowGenerators([], self.device)
        view.gens = self.gens[start:end]
        return view


Generator = torch.Generator | RowGenerators | None


def uniform(shape: tuple[int, ...], generator: Generator, device=None) -> torch.Tensor:
    """Uniforms of `shape`; with `RowGenerators`, shape[0] is the batch and row i comes from stream i."""
    if isinstance(generator, RowGenerators):
        return generator.rand(tuple(shape[1:]))
    return torch.rand(shape, generator=generator, device=device)


def normal(shape: tuple[int, ...], generator: Generator, device=None) -> torch.Tensor:
    if isinstance(generator, RowGenerators):
        return generator.randn(tuple(shape[1:]))
    return torch.randn(shape, generator=generator, device=device)


def sample_ids(logits: torch.Tensor, generator: Generator = None) -> torch.Tensor:
    """One id per row of logits [..., V] (rows with -inf entries allowed). With `RowGenerators` (logits [R, V]) each
    row inverts its CDF at one uniform of its own stream."""
    flat = logits.reshape(-1, logits.shape[-1]).float().softmax(-1)
    if not flat.sum(-1).isfinite().all():  # a NaN or +inf logit, or a row of -inf: no distribution to sample
        raise SoftarError("sampling: the model's next-token logits are not finite (NaN, +inf, or all -inf in a row); "
                          "the weights or the inputs have diverged")
    if isinstance(generator, RowGenerators):
        cdf = flat.cumsum(-1)
        u = generator.rand().to(cdf)[:, None] * cdf[:, -1:]
        return torch.searchsorted(cdf, u, right=True).clamp_max(flat.shape[-1] - 1).view(logits.shape[:-1])
    return torch.multinomial(flat, 1, generator=generator).view(logits.shape[:-1])


def entropy(logits: torch.Tensor) -> torch.Tensor:
    logp = logits.log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


def top_probs(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What a reader wants of a next-token distribution logits [..., V] (temperature 1, unfiltered): its k most
    likely ids [..., k], their probabilities [..., k], and its entropy [...] in nats."""
    logits = logits.float()
    top = logits.softmax(-1).topk(min(k, logits.shape[-1]))
    return top.indices, top.values, entropy(logits)


def probs(logits: torch.Tensor, top_k: int = 0) -> torch.Tensor:
    """softmax(logits), optionally over the top-k renormalised (Soft Thinking)."""
    return filter_logits(logits, top_k).softmax(-1)


# -- the definitions ------------------------------------------------------------------------------------------------
@soft_token("expected")
def expected(out: Outputs, E: torch.Tensor, spec, generator=None) -> torch.Tensor:
    """The expected embedding p @ E (optionally over the top-k): Soft Thinking's concept token."""
    return probs(out.logits, spec.top_k) @ E


@soft_token("regress", needs_head="vector_head")
def regress(out: Outputs, E: torch.Tensor, spec, generator=None) -> torch.Tensor:
    """The vector head's y, trained by regression to the next token's embedding."""
    return out.y


@soft_token("hidden", params={"rescale": 0.0})
def hidden(out: Outputs, E: torch.Tensor, spec, generator=None) -> torch.Tensor:
    """The last hidden state mapped to R^m, fed back as it is (Coconut's continuous thought); with rescale r > 0,
    at r times the embeddings' mean norm instead.

    As it is, a thought can be many times a token's norm (about 16x in the twins runs), so it dominates the
    residual stream at its slot; rescaled, it enters at a token's scale, its direction kept."""
    r = spec.args["rescale"]
    if not r:
        return out.h_m
    return out.h_m * (r * E.norm(dim=-1).mean() / out.h_m.norm(dim=-1, keepdim=True).clamp_min(1e-12))


@soft_token("collapse", needs_head="collapse_head")
def collapse(out: Outputs, E: torch.Tensor, spec, generator=None) -> torch.Tensor:
    """The collapse head's c: a learned map onto R^m from a layer where the whole context is mixed."""
    return out.c


@soft_token("gated", samples=True)
def gated(out: Outputs, E: torch.Tensor, spec, generator=None) -> torch.Tensor:
    """w * expected + (1 - w) * E[sampled], w the entropy normalised by log V: a confident step is nearly its
    sampled token, an uncertain one keeps the blend."""
    return gated_mix(out, E, spec, sample_ids(out.logits, generator))


def gated_mix(out: Outputs, E: torch.Tensor, spec, ids: torch.Tensor) -> torch.Tensor:
    """The gated soft token for given sampled ids [...] (a policy replays its own draws through it)."""
    w = (entropy(out.logits) / math.log(out.logits.shape[-1])).unsqueeze(-1)
    return w * expected(out, E, spec) + (1 - w) * E[ids]


@soft_token("moi", params={"beta": 1.0}, samples=True)
def mixture_of_inputs(out: Outputs, E: torch.Tensor, spec, generator=None) -> torch.Tensor:
    """Mixture of Inputs (Zhuang et al. 2025): Bayesian estimation with the model's distribution p as the prior and
    the sampled token y as the observation, weighted by how unsure the model is (H, the entropy over log V):
    w = (H p + (beta + 1 - H) onehot(y)) / (beta + 1), and the input is w @ E. beta = 0 is `gated`; a large beta
    is the sampled token."""
    beta = spec.args["beta"]
    p = probs(out.logits.float(), spec.top_k)
    H = (entropy(out.logits.float()) / math.log(p.shape[-1])).unsqueeze(-1)
    y = torch.nn.functional.one_hot(sample_ids(out.logits, generator), p.shape[-1]).to(p.dtype)
    return ((H * p + (beta + 1 - H) * y) / (beta + 1)).to(E.dtype) @ E


def make_soft_token(out: Outputs, E: torch.Tensor, spec, generator: Generator = None) -> torch.Tensor:
    """The soft token `spec.kind` at every position of `out`: [..., m]; the definition's parameters default to
    those it registered."""
    d = SOFT_TOKENS[spec.kind]
    if set(d.params) - set(spec.args):
        spec = dataclasses.replace(spec, args={**d.params, **spec.args})
    return d.fn(out, E, spec, generator)


# -- noise ----------------------------------------------------------------------------------------------------------
def _gaussian(v, E, logits, scale, generator):
    """Gaussian on the vector, std = scale x E's root-mean-square coordinate."""
    rms = E.norm(dim=-1).mean() / math.sqrt(E.shape[-1])
    return v + scale * rms * normal(v.shape, generator, v.device).to(v.dtype)


def _dirichlet(v, E, logits, scale, generator):
    """Resample the distribution behind the token: Dirichlet with mean p and concentration 1 / scale (torch's
    Dirichlet takes no generator: it draws from the global stream)."""
    alpha = logits.float().softmax(-1) / scale + 1e-6
    return torch.distributions.Dirichlet(alpha).sample().to(E.dtype) @ E


def _gumbel(v, E, logits, scale, generator):
    """Gumbel-perturbed logits (scale x Gumbel noise), then the expected embedding."""
    u = uniform(logits.shape, generator, logits.device).clamp_(1e-10, 1 - 1e-10)
    return (logits - scale * torch.log(-torch.log(u))).softmax(-1) @ E


NOISES: dict[str, Callable | None] = {"none": None, "gaussian": _gaussian, "dirichlet": _dirichlet,
                                      "gumbel": _gumbel}


def add_noise(spec, v: torch.Tensor, E: torch.Tensor, logits: torch.Tensor,
              generator: Generator = None) -> torch.Tensor:
    """`spec.noise` at `spec.noise_scale` on soft tokens v [..., m] that came from `logits` [..., V]."""
    fn = NOISES[spec.noise]
    return v if fn is None or spec.noise_scale == 0 else fn(v, E, logits, spec.noise_scale, generator)


def spec_problem(spec, heads: set[str]) -> tuple[str, str] | None:
    """(config key, message) if a soft-token spec cannot run on a model, else None."""
    if spec.kind not in SOFT_TOKENS:
        return "soft.kind", f"expected one of {', '.join(map(repr, SOFT_TOKENS))}, got {spec.kind!r}"
    d = SOFT_TOKENS[spec.kind]
    if d.needs_head and d.needs_head not in heads:
        return "soft.kind", f"{spec.kind!r} needs model.{d.needs_head} = true"
    unknown = sorted(set(spec.args) - set(d.params))
    if unknown:
        return "soft.args", (f"{spec.kind!r} takes {', '.join(d.params) or 'no parameters'}, "
                             f"not {', '.join(unknown)}")
    if not all(isinstance(v, int | float) and math.isfinite(v) and v >= 0 for v in spec.args.values()):
        return "soft.args", "parameters must be finite numbers >= 0"
    if spec.noise not in NOISES:
        return "soft.noise", f"expected one of {', '.join(map(repr, NOISES))}, got {spec.noise!r}"
    if not 0 <= spec.noise_scale <= 100:
        return "soft.noise_scale", "must be in [0, 100] (a multiple of the embeddings' scale)"
    return None
