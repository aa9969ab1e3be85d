"""Feeds, what re-enters the context: the registry the CLI and RL read, draws against formulas written out here,
replays that reproduce a draw and score it, and the checks that refuse what a model cannot run."""

import math

import pytest
import torch

from softar.config import ModelConfig, SoftConfig
from softar.model import Outputs
from softar.soft.collapse import Sampling
from softar.soft.feeds import (
    FEEDS,
    Choice,
    ConstantFeed,
    Draw,
    HardFeed,
    NoisySoftFeed,
    SoftFeed,
    TeacherFeed,
    make_policy,
    text_feeds,
    thought_policies,
)
from softar.soft.tokens import RowGenerators

from .conftest import soft_model


def model():
    torch.manual_seed(0)
    return soft_model(ModelConfig(n_layer=1, n_head=2, d_model=8, block_size=8, vocab_size=6)).eval()


def outputs(R: int = 4, V: int = 6, m: int = 8, scale: float = 1.0) -> Outputs:
    g = torch.Generator().manual_seed(1)
    return Outputs(logits=torch.randn(R, V, generator=g) * 2, h_m=torch.randn(R, m, generator=g) * scale)


def test_the_registry_says_what_the_cli_and_rl_offer():
    assert list(FEEDS) == ["hard", "soft", "noisy_soft", "gated", "teacher", "constant"]
    assert text_feeds() == ["hard", "soft"] and thought_policies() == ["hard", "soft", "noisy_soft", "gated"]
    assert all(cls.doc and cls.name == name for name, cls in FEEDS.items())
    with pytest.raises(ValueError, match="policy: expected one of"):
        make_policy("teacher", SoftConfig())


def test_hard_draws_are_the_temperature_softmax_and_a_replay_scores_the_recorded_token():
    m, out = model(), outputs()
    feed = HardFeed(Sampling(temperature=0.7))
    c = feed.choose(m, out, Draw(RowGenerators([1, 2, 3, 4]), score=True))
    assert c.hard and torch.equal(c.vector, m.E[c.token])
    by_hand = (out.logits / 0.7).log_softmax(-1).gather(-1, c.token[:, None])[:, 0]
    torch.testing.assert_close(c.logp, by_hand)
    again = feed.choose(m, out, Draw(score=True, recorded=Choice(c.vector, c.token, True)))
    assert torch.equal(again.token, c.token) and torch.equal(again.logp, c.logp)
    greedy = HardFeed(Sampling(temperature=0.0)).choose(m, out, Draw())
    assert torch.equal(greedy.token, out.logits.argmax(-1)) and greedy.logp is None


def test_noisy_soft_noise_is_relative_to_each_groups_soft_tokens_and_replays_exactly():
    """Rows 0-1 and 2-3 are two groups whose soft tokens (Coconut's hidden state) differ 10x in scale: each group's
    noise std is sigma times its own root-mean-square coordinate, and the log-density is the Gaussian's."""
    m = model()
    out = outputs()
    out = Outputs(out.logits, torch.cat([out.h_m[:2], out.h_m[2:] * 10]))
    feed = NoisySoftFeed(SoftConfig(kind="hidden"), sigma=0.5, group=2)
    c = feed.choose(m, out, Draw(RowGenerators([5, 6, 7, 8]), rows=torch.arange(4), score=True))
    rms = [out.h_m[i : i + 2].pow(2).mean().sqrt() for i in (0, 2)]
    torch.testing.assert_close(c.scale, torch.stack([0.5 * rms[0]] * 2 + [0.5 * rms[1]] * 2))
    x, mu, s = c.vector, out.h_m, c.scale
    by_hand = -((x - mu) ** 2).sum(-1) / (2 * s**2) - 8 * (s.log() + 0.5 * math.log(2 * math.pi))
    torch.testing.assert_close(c.logp, by_hand)
    again = feed.choose(m, out, Draw(score=True, recorded=c))
    assert torch.equal(again.vector, x) and torch.equal(again.logp, c.logp)


def test_soft_feeds_make_the_soft_token_and_show_its_collapse():
    m, out = model(), outputs()
    c = SoftFeed(SoftConfig(kind="expected"), noisy=False, collapse="nn_l2").choose(m, out, Draw())
    expected = out.logits.softmax(-1) @ m.E
    torch.testing.assert_close(c.vector, expected)
    assert not c.hard and torch.equal(c.token, torch.cdist(expected, m.E).argmin(-1))
    assert (SoftFeed(collapse=None).choose(m, out, Draw()).token == -1).all()  # a thought shows no token


def test_teacher_and_constant_feeds():
    m, out = model(), outputs(R=2)
    truth = torch.tensor([[1, 2, 3], [4, 5, 0]])
    c = TeacherFeed(truth).choose(m, out, Draw(rows=torch.tensor([1, 0]), step=2))
    assert c.hard and c.token.tolist() == [0, 3] and torch.equal(c.vector, m.E[[0, 3]])
    v = torch.arange(8.0)
    c = ConstantFeed(v).choose(m, out, Draw())
    assert torch.equal(c.vector, v.expand(2, 8)) and not c.hard


def test_feeds_refuse_what_a_model_cannot_run():
    m = model()
    with pytest.raises(ValueError, match="collapse head"):
        SoftFeed(collapse="head").check(m)
    with pytest.raises(ValueError, match="draws a token"):
        SoftFeed(SoftConfig(kind="moi")).check(m, replay=True)
    SoftFeed(SoftConfig(kind="moi")).check(m)  # decoding text with it is fine
    with pytest.raises(ValueError, match="no learned gate"):
        make_policy("gated", SoftConfig(kind="hidden")).check(m)
