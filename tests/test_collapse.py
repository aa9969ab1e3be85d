import math

import pytest
import torch
import torch.nn.functional as F

from softar.collapse import (
    add_noise,
    collapse,
    entropy,
    expected_embedding,
    filter_logits,
    gated_embedding,
    round_trip_gap,
    soft_token,
)

# a hand-built space: 4 tokens in R^2
E = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [3.0, 3.0]])


def test_nearest_neighbour_l2_and_cosine_differ_where_they_should():
    v = torch.tensor([[0.9, 0.1], [1.2, 1.0], [-0.1, 0.2]])
    assert collapse("nn_l2", E, v).tolist() == [0, 0, 1]  # [1.2, 1.0] is nearer to e0 than to the long e3
    assert collapse("nn_cos", E, v).tolist() == [0, 3, 1]  # ... but points along e3
    assert collapse("head", E, v).tolist() == [0, 0, 1]


def test_lm_head_collapse_and_sampling():
    logits = torch.tensor([[0.0, 5.0, 1.0, -2.0], [3.0, 0.0, 0.0, 0.0]])
    assert collapse("lm_argmax", E, logits=logits).tolist() == [1, 0]
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([collapse("lm_sample", E, logits=logits, top_k=1, generator=g) for _ in range(20)])
    assert (draws == torch.tensor([1, 0])).all()  # top-1 sampling is greedy
    draws = torch.stack([collapse("lm_sample", E, logits=logits, generator=g) for _ in range(400)])
    assert set(draws[:, 0].tolist()) > {1}  # plain sampling visits other tokens


def test_similarity_sampling_with_low_temperature_is_nearest_cosine():
    v = torch.tensor([[0.9, 0.1], [1.2, 1.0]])
    g = torch.Generator().manual_seed(0)
    assert collapse("sample_sim", E, v, temperature=1e-4, generator=g).tolist() == [0, 3]
    got = {collapse("sample_sim", E, v[:1], temperature=10.0, top_k=2, generator=g).item() for _ in range(200)}
    assert got == {0, 3}  # top-2 by cosine of [0.9, 0.1]: e0 and e3


def test_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(filter_logits(logits, top_p=0.75))
    assert kept.tolist() == [[True, True, False, False]]


def test_expected_soft_token_is_p_at_E():
    logits = torch.randn(2, 3, 4)
    torch.testing.assert_close(expected_embedding(logits, E), logits.softmax(-1) @ E)
    p2 = logits.softmax(-1).clone()
    top2 = p2.topk(2, dim=-1).indices
    mask = torch.zeros_like(p2).scatter(-1, top2, 1.0)
    ref = (p2 * mask) / (p2 * mask).sum(-1, keepdim=True) @ E
    torch.testing.assert_close(expected_embedding(logits, E, top_k=2), ref)
    torch.testing.assert_close(soft_token("expected", E, logits=logits), logits.softmax(-1) @ E)


def test_gated_mix_follows_entropy():
    g = torch.Generator().manual_seed(0)
    confident = torch.tensor([[50.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(gated_embedding(confident, E, g), E[:1], atol=1e-4, rtol=0)
    uniform = torch.zeros(1, 4)
    assert entropy(uniform).item() == pytest.approx(math.log(4))
    torch.testing.assert_close(gated_embedding(uniform, E, g), E.mean(0, keepdim=True))  # weight 1 on expected


def test_round_trip_gap():
    v = torch.tensor([[1.0, 0.5]])
    assert round_trip_gap(v, E).item() == pytest.approx(0.5)


def test_noise_kinds_are_seeded_and_shaped():
    logits = torch.randn(5, 4)
    v = expected_embedding(logits, E)
    assert torch.equal(add_noise("none", 1.0, v, E), v)
    for kind in ("gaussian", "gumbel"):
        a = add_noise(kind, 0.5, v, E, logits, torch.Generator().manual_seed(1))
        b = add_noise(kind, 0.5, v, E, logits, torch.Generator().manual_seed(1))
        assert a.shape == v.shape and torch.equal(a, b) and not torch.equal(a, v)
    torch.manual_seed(0)
    d = add_noise("dirichlet", 0.1, v, E, logits)
    assert d.shape == v.shape and not torch.equal(d, v)
    with pytest.raises(ValueError, match="needs logits"):
        add_noise("dirichlet", 0.1, v, E)


def test_soft_token_kinds():
    y, h = torch.randn(2, 2), torch.randn(2, 2)
    assert torch.equal(soft_token("regress", E, y=y), y) and torch.equal(soft_token("hidden", E, h_m=h), h)
    with pytest.raises(ValueError, match="vector head"):
        soft_token("regress", E)
    assert F.cosine_similarity(soft_token("gated", E, logits=torch.zeros(1, 4)), E.mean(0, keepdim=True)).item() > 0.99
