"""The soft-token registry: each definition against a hand-computed case, and the noises."""

import math

import pytest
import torch
import torch.nn.functional as F

from softar.config import SoftConfig
from softar.model import Outputs
from softar.soft.tokens import SOFT_TOKENS, add_noise, entropy, make_soft_token, spec_problem

E = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [3.0, 3.0]])  # 4 tokens in R^2


def outs(logits, y=None, h_m=None) -> Outputs:
    return Outputs(logits=logits, h_m=torch.zeros(*logits.shape[:-1], 2) if h_m is None else h_m, y=y)


def soft(kind, out, generator=None, **spec):
    return make_soft_token(out, E, SoftConfig(kind=kind, **spec), generator)


def test_expected_is_p_at_E_and_top_k_renormalises():
    logits = torch.randn(2, 3, 4)
    torch.testing.assert_close(soft("expected", outs(logits)), logits.softmax(-1) @ E)
    p = logits.softmax(-1)
    mask = torch.zeros_like(p).scatter(-1, p.topk(2, dim=-1).indices, 1.0)
    torch.testing.assert_close(soft("expected", outs(logits), top_k=2), (p * mask) / (p * mask).sum(-1, True) @ E)


def test_regress_and_hidden_pass_their_vector_through():
    y, h = torch.randn(2, 2), torch.randn(2, 2)
    assert torch.equal(soft("regress", outs(torch.zeros(2, 4), y=y)), y)
    assert torch.equal(soft("hidden", outs(torch.zeros(2, 4), h_m=h)), h)


def test_hidden_rescaled_keeps_its_direction_at_a_multiple_of_the_mean_embedding_norm():
    h = torch.tensor([[3.0, 4.0], [0.0, -2.0]])
    mean_norm = (1 + 1 + 1 + math.sqrt(18)) / 4  # E's rows by hand
    want = torch.tensor([[0.6, 0.8], [0.0, -1.0]]) * 2 * mean_norm
    torch.testing.assert_close(soft("hidden", outs(torch.zeros(2, 4), h_m=h), args={"rescale": 2.0}), want)


def test_gated_mix_follows_entropy():
    g = torch.Generator().manual_seed(0)
    torch.testing.assert_close(soft("gated", outs(torch.tensor([[50.0, 0.0, 0.0, 0.0]])), g), E[:1], atol=1e-4,
                               rtol=0)
    uniform = torch.zeros(1, 4)
    assert entropy(uniform).item() == pytest.approx(math.log(4))
    torch.testing.assert_close(soft("gated", outs(uniform), g), E.mean(0, keepdim=True))  # weight 1 on expected


def test_mixture_of_inputs_by_hand():
    """p = (0.5, 0.25, 0.125, 0.125): entropy 1.75 ln 2 nats, so H = 1.75 ln 2 / ln 4 = 0.875. The sample is
    token 1 (a generator draw we replay); beta = 3: w = (0.875 p + (4 - 0.875) e_1) / 4
    = (0.109375, 0.8359375, 0.02734375, 0.02734375); input = w @ E = (0.109375 - 0.02734375 + 3 * 0.02734375,
    0.8359375 + 3 * 0.02734375) = (0.1640625, 0.91796875)."""
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.125, 0.125]]))
    seed = next(s for s in range(100) if torch.multinomial(logits.softmax(-1), 1,
                                                           generator=torch.Generator().manual_seed(s)).item() == 1)
    g = lambda: torch.Generator().manual_seed(seed)  # noqa: E731
    got = soft("moi", outs(logits), g(), args={"beta": 3.0})
    torch.testing.assert_close(got, torch.tensor([[0.1640625, 0.91796875]]))
    # beta = 0 is the entropy-gated mix; a huge beta is the sampled token's embedding; beta defaults to 1
    torch.testing.assert_close(soft("moi", outs(logits), g(), args={"beta": 0.0}), soft("gated", outs(logits), g()))
    torch.testing.assert_close(soft("moi", outs(logits), g(), args={"beta": 1e9}), E[1:2], atol=1e-6, rtol=0)
    torch.testing.assert_close(soft("moi", outs(logits), g()), soft("moi", outs(logits), g(), args={"beta": 1.0}))


def test_noise_kinds_are_seeded_and_shaped():
    logits = torch.randn(5, 4)
    v = soft("expected", outs(logits))
    assert torch.equal(add_noise(SoftConfig(noise="none", noise_scale=1.0), v, E, logits), v)
    for kind in ("gaussian", "gumbel"):
        spec = SoftConfig(noise=kind, noise_scale=0.5)
        a = add_noise(spec, v, E, logits, torch.Generator().manual_seed(1))
        b = add_noise(spec, v, E, logits, torch.Generator().manual_seed(1))
        assert a.shape == v.shape and torch.equal(a, b) and not torch.equal(a, v)
    torch.manual_seed(0)
    d = add_noise(SoftConfig(noise="dirichlet", noise_scale=0.1), v, E, logits)
    assert d.shape == v.shape and not torch.equal(d, v)
    assert F.cosine_similarity(soft("gated", outs(torch.zeros(1, 4))), E.mean(0, keepdim=True)).item() > 0.99


def test_spec_problems_name_the_key():
    assert spec_problem(SoftConfig(), set()) is None
    assert spec_problem(SoftConfig(kind="nope"), set())[0] == "soft.kind"
    assert spec_problem(SoftConfig(kind="regress"), set()) == ("soft.kind", "'regress' needs model.vector_head = true")
    assert spec_problem(SoftConfig(kind="collapse"), {"vector_head"}) == (
        "soft.kind", "'collapse' needs model.collapse_head = true")
    assert spec_problem(SoftConfig(kind="collapse"), {"collapse_head"}) is None
    assert spec_problem(SoftConfig(kind="moi", args={"gamma": 1.0}), set())[0] == "soft.args"
    assert spec_problem(SoftConfig(kind="moi", args={"beta": 2.0}), set()) is None
    assert spec_problem(SoftConfig(kind="moi", args={"beta": -1.0}), set())[0] == "soft.args"
    assert spec_problem(SoftConfig(noise="uniform"), set())[0] == "soft.noise"
    assert set(SOFT_TOKENS) >= {"expected", "regress", "hidden", "gated", "moi"}
