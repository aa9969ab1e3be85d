"""Feeds: what goes back into the context after each step. A registry.

Every loop that continues a context asks a feed, at each step, for the vector that re-enters it: decoding text
(`softar.decode`), the continuous thoughts of a reasoning task in training and at inference (`fill_slots`), the soft
region's rollout in training, RL rollouts and their replay, the open-loop metrics. A feed reads the model's outputs
at the last slot [R, ...] and returns a `Choice`: the vector [R, m], the token shown [R] (-1 when it shows none),
whether the vector is that token's embedding, and, when asked (`Draw.score`), the log-probability of what it drew:
an RL action's.

Replaying: given the `Choice` a rollout recorded (`Draw.recorded`), a feed draws nothing and recomputes the same
vector under the current weights, with gradients, and the log-probability of the recorded action. A feed whose soft
token itself samples a token (`soft.kind` gated or moi) cannot be replayed (`check`).

Adding a feed is one registered class here (and its test); the CLI's choices and RL's thought policies are read
from `FEEDS`:

    @register("mine")
    class MyFeed(Feed):
        def choose(self, model, out, draw): ...
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from softar.config import SoftConfig
from softar.model.interface import Outputs
from softar.soft.collapse import COLLAPSES, Sampling, collapse, nearest
from softar.soft.gate import GATE
from softar.soft.tokens import SOFT_TOKENS, Generator, add_noise, heads_of, make_soft_token, normal, sample_ids


@dataclass
class Choice:
    """What one step feeds back, for R rows."""

    vector: torch.Tensor  # [R, m] what re-enters the context
    token: torch.Tensor  # [R] the token shown; -1 where the feed shows none
    hard: bool  # the vector is E[token]: a hard token re-entered
    logp: torch.Tensor | None = None  # [R] log-probability (or density) of the drawn action, when Draw.score asks
    scale: torch.Tensor | None = None  # [R] noisy_soft: the noise's std at this step (replayed as a constant)


@dataclass
class Draw:
    """How a feed draws at one step: the random streams of the active rows, each row's index in the batch as first
    given (RL's groups are consecutive rows of one prompt), the step, whether to score the action, and a recorded
    choice to replay instead of drawing."""

    generator: Generator = None
    rows: torch.Tensor | None = None  # [R]
    step: int = 0
    score: bool = False
    recorded: Choice | None = None


class Feed:
    name: ClassVar[str] = ""
    doc: ClassVar[str] = ""
    text: ClassVar[bool] = False  # offered by `softar sample` / `inspect` (--mode)
    policy: ClassVar[bool] = False  # offered as a thought policy (rl.policy, eval --policy)
    replayable: ClassVar[bool] = True  # `Draw.recorded` reproduces a draw

    def choose(self, model, out: Outputs, draw: Draw) -> Choice:
        raise NotImplementedError

    def check(self, model, replay: bool = False) -> None:
        """A ValueError if this feed cannot run on `model` (or, with `replay`, cannot replay its draws)."""

    def describe(self) -> dict:
        return {"feed": self.name, **{f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)
                                      if f.repr}}

    def filler(self, model, generator: Generator = None, dtype: torch.dtype | None = None):
        """This feed as `fill_slots` calls it: (outputs at the slot before [B, 1, ...], t) -> the vector [B, 1, m]."""

        def fill(out: Outputs, t: int) -> torch.Tensor:
            v = self.choose(model, out.at((slice(None), -1)), Draw(generator, step=t)).vector[:, None]
            return v if dtype is None else v.to(dtype)

        return fill


def _plain(v):
    if isinstance(v, SoftConfig | Sampling):
        return {k: _plain(x) for k, x in dataclasses.asdict(v).items() if k != "generator"}
    return v if isinstance(v, int | float | str | bool | dict | None) else repr(v)


FEEDS: dict[str, type[Feed]] = {}


def register(name: str):
    """Register a feed class under `name`; its docstring's first line is its description."""

    def add(cls: type[Feed]) -> type[Feed]:
        cls.name = name
        cls.doc = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())
        FEEDS[name] = cls
        return cls

    return add


def text_feeds() -> list[str]:
    return [n for n, f in FEEDS.items() if f.text]


def thought_policies() -> list[str]:
    return [n for n, f in FEEDS.items() if f.policy]


def _log_softmax_at(logits: torch.Tensor, ids: torch.Tensor, temperature: float) -> torch.Tensor:
    return (logits.float() / temperature).log_softmax(-1).gather(-1, ids[:, None])[:, 0]


def _no_token(out: Outputs) -> torch.Tensor:
    return torch.full(out.logits.shape[:-1], -1, dtype=torch.long, device=out.logits.device)


def gaussian_log_density(x: torch.Tensor, mean: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """log N(x; mean, sigma^2 I) over the last dimension [..., m] -> [...]: a noisy soft thought's log-probability
    (sigma a number, or one per row [...])."""
    m = x.shape[-1]
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    return -(x - mean).pow(2).sum(-1) / (2 * sigma**2) - m * (sigma.log() + 0.5 * math.log(2 * math.pi))


def _check_replayable(name: str, spec: SoftConfig) -> None:
    if SOFT_TOKENS[spec.kind].samples:
        raise ValueError(f"{name!r}: soft.kind {spec.kind!r} draws a token, so a replay would not reproduce its "
                         "vectors; use expected, hidden, regress or collapse")


@register("hard")
@dataclass
class HardFeed(Feed):
    """A token drawn from the model's distribution (temperature, top-k, top-p; temperature 0 is greedy) re-enters
    as its embedding."""

    sampling: Sampling = field(default_factory=Sampling)
    text: ClassVar[bool] = True
    policy: ClassVar[bool] = True

    @classmethod
    def as_policy(cls, spec: SoftConfig, temperature: float, sigma: float, group: int) -> HardFeed:
        return cls(Sampling(temperature))

    def choose(self, model, out: Outputs, draw: Draw) -> Choice:
        s = self.sampling
        if draw.recorded is not None:
            y = draw.recorded.token
        else:
            y = Sampling(s.temperature, s.top_k, s.top_p, draw.generator).draw(out.logits)
        logp = _log_softmax_at(out.logits, y, s.temperature) if draw.score and s.temperature > 0 else None
        return Choice(model.E[y], y, True, logp)


@register("soft")
@dataclass
class SoftFeed(Feed):
    """The model's own soft token (`soft.kind`: expected embedding, Coconut's hidden state, ...) re-enters, with
    `soft.noise` when `noisy`; the token shown is its collapse (`collapse`, drawn with `sampling`; None shows none).
    Continuous thoughts are this feed without a shown token."""

    spec: SoftConfig = field(default_factory=SoftConfig)
    noisy: bool = True
    collapse: str | None = "nn_l2"
    sampling: Sampling = field(default_factory=Sampling)
    text: ClassVar[bool] = True
    policy: ClassVar[bool] = True

    @classmethod
    def as_policy(cls, spec: SoftConfig, temperature: float, sigma: float, group: int) -> SoftFeed:
        return cls(spec, noisy=False, collapse="lm_argmax")  # shows the step it stands for (a path reward reads it)

    @classmethod
    def thoughts(cls, model) -> SoftFeed:
        """The continuous thoughts of a reasoning task: the model's soft token, with its noise in training only."""
        return cls(model.soft_spec, noisy=model.training, collapse=None)

    def check(self, model, replay: bool = False) -> None:
        need = COLLAPSES[self.collapse].needs_head if self.collapse else ""
        if need and need not in heads_of(model.lm):
            raise ValueError(f"collapse {self.collapse!r} needs a model with a {need.replace('_', ' ')} (model.{need} "
                             "= true)")
        if replay:
            _check_replayable(self.name, self.spec)

    def choose(self, model, out: Outputs, draw: Draw) -> Choice:
        E, gen = model.E, draw.generator
        v = make_soft_token(out, E, self.spec, gen)
        if self.noisy:
            v = add_noise(self.spec, v, E, out.logits, gen)
        s = self.sampling
        token = collapse(self.collapse, v, out, E, Sampling(s.temperature, s.top_k, s.top_p, gen)) \
            if self.collapse else _no_token(out)
        return Choice(v, token, False)


@register("noisy_soft")
@dataclass
class NoisySoftFeed(Feed):
    """The soft token plus Gaussian noise, x = mu + s * eps, s = sigma times the root-mean-square coordinate of
    the soft tokens of the row's group (`group` consecutive rows; so sigma means the same for Coconut's large hidden
    states and for expected embeddings); x is an action with log-density log N(x; mu, s^2 I) (Soft Tokens, Hard
    Truths). It shows the LM head's most likely token, the step the soft token stands for."""

    spec: SoftConfig = field(default_factory=SoftConfig)
    sigma: float = 0.5
    group: int = 1
    policy: ClassVar[bool] = True

    @classmethod
    def as_policy(cls, spec: SoftConfig, temperature: float, sigma: float, group: int) -> NoisySoftFeed:
        return cls(spec, sigma, group)

    def check(self, model, replay: bool = False) -> None:
        _check_replayable(self.name, self.spec)

    def choose(self, model, out: Outputs, draw: Draw) -> Choice:
        mu = make_soft_token(out, model.E, self.spec)
        if draw.recorded is not None:
            std, x = draw.recorded.scale, draw.recorded.vector
        else:
            groups = draw.rows // self.group  # [R]
            sq = mu.detach().float().pow(2).mean(-1)  # [R]
            total = torch.zeros(int(groups.max()) + 1, device=mu.device).index_add_(0, groups, sq)
            count = torch.zeros_like(total).index_add_(0, groups, torch.ones_like(sq))
            std = self.sigma * (total / count.clamp_min(1)).sqrt()[groups]  # [R]
            x = mu + std[:, None].to(mu.dtype) * normal(mu.shape, draw.generator, mu.device).to(mu.dtype)
        logp = gaussian_log_density(x.float(), mu.float(), std) if draw.score else None
        return Choice(x, out.logits.argmax(-1), False, logp, std)


@register("gated")
@dataclass
class GatedFeed(Feed):
    """HRPO's hybrid thought (`softar.soft.gate`): a learned gate mixes E[y], for a token y drawn at `temperature`
    (the action), with the model's soft token. Only a model with a gate (an RL run of this policy) runs it."""

    spec: SoftConfig = field(default_factory=SoftConfig)
    temperature: float = 1.0
    policy: ClassVar[bool] = True

    @classmethod
    def as_policy(cls, spec: SoftConfig, temperature: float, sigma: float, group: int) -> GatedFeed:
        return cls(spec, temperature)

    def check(self, model, replay: bool = False) -> None:
        if getattr(model, GATE, None) is None:
            raise ValueError("'gated': the model has no learned gate (a run trained with rl.policy = \"gated\" has "
                             "one)")
        _check_replayable(self.name, self.spec)

    def choose(self, model, out: Outputs, draw: Draw) -> Choice:
        E = model.E
        if draw.recorded is not None:
            y = draw.recorded.token
        else:
            y = sample_ids((out.logits.float() / self.temperature).log_softmax(-1), draw.generator)
        v = getattr(model, GATE)(out.h_m, E[y], make_soft_token(out, E, self.spec), E.pow(2).mean().sqrt())
        logp = _log_softmax_at(out.logits, y, self.temperature) if draw.score else None
        return Choice(v, y, False, logp)


@register("teacher")
@dataclass
class TeacherFeed(Feed):
    """Teacher forcing: the true next tokens `ids` [B, N] (row and step), each re-entering as its embedding."""

    ids: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0, dtype=torch.long), repr=False)

    def choose(self, model, out: Outputs, draw: Draw) -> Choice:
        y = self.ids[draw.rows, draw.step]
        return Choice(model.E[y], y, True)


@register("constant")
@dataclass
class ConstantFeed(Feed):
    """One fixed vector [m] at every step, which carries no information: the open-loop null."""

    vector: torch.Tensor = field(default_factory=lambda: torch.zeros(0), repr=False)

    def choose(self, model, out: Outputs, draw: Draw) -> Choice:
        R = out.logits.shape[0]
        v = self.vector.to(model.E.dtype).expand(R, -1)
        return Choice(v, nearest(v[:1], model.E).expand(R), False)


def make_policy(name: str, spec: SoftConfig, temperature: float = 1.0, sigma: float = 0.5, group: int = 1) -> Feed:
    """The feed of a thought policy (rl.policy, `softar eval --policy`) for a model whose soft token is `spec`."""
    if name not in thought_policies():
        raise ValueError(f"policy: expected one of {', '.join(thought_policies())}, got {name!r}")
    return FEEDS[name].as_policy(spec, temperature, sigma, group)
