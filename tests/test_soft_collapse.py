import pytest
import torch

from softar.model import Outputs
from softar.soft.collapse import COLLAPSES, CollapsePolicy, Sampling, collapse, round_trip_gap
from softar.soft.tokens import filter_logits

# a hand-built space: 4 tokens in R^2
E = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [3.0, 3.0]])


def outs(logits=None, c=None, n=1) -> Outputs:
    logits = torch.zeros(n, 4) if logits is None else logits
    return Outputs(logits=logits, h_m=torch.zeros(*logits.shape[:-1], 2), c=c)


def test_nearest_neighbour_l2_and_cosine_differ_where_they_should():
    v = torch.tensor([[0.9, 0.1], [1.2, 1.0], [-0.1, 0.2]])
    assert collapse("nn_l2", v, outs(n=3), E).tolist() == [0, 0, 1]  # [1.2, 1.0] is nearer to e0 than to long e3
    assert collapse("nn_cos", v, outs(n=3), E).tolist() == [0, 3, 1]  # ... but points along e3
    # the collapse head collapses its own vector c, not the soft token
    assert collapse("head", torch.zeros(3, 2), outs(n=3, c=v), E).tolist() == [0, 0, 1]
    with pytest.raises(ValueError, match="collapse head"):
        collapse("head", v, outs(n=3), E)


def test_lm_head_collapse_and_sampling():
    logits = torch.tensor([[0.0, 5.0, 1.0, -2.0], [3.0, 0.0, 0.0, 0.0]])
    v = torch.zeros(2, 2)
    assert collapse("lm_argmax", v, outs(logits), E).tolist() == [1, 0]
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([collapse("lm_sample", v, outs(logits), E, Sampling(top_k=1, generator=g)) for _ in range(20)])
    assert (draws == torch.tensor([1, 0])).all()  # top-1 sampling is greedy
    draws = torch.stack([collapse("lm_sample", v, outs(logits), E, Sampling(generator=g)) for _ in range(400)])
    assert set(draws[:, 0].tolist()) > {1}  # plain sampling visits other tokens


def test_similarity_sampling_with_low_temperature_is_nearest_cosine():
    v = torch.tensor([[0.9, 0.1], [1.2, 1.0]])
    g = torch.Generator().manual_seed(0)
    assert collapse("sample_sim", v, outs(n=2), E, Sampling(1e-4, generator=g)).tolist() == [0, 3]
    got = {collapse("sample_sim", v[:1], outs(), E, Sampling(10.0, top_k=2, generator=g)).item() for _ in range(200)}
    assert got == {0, 3}  # top-2 by cosine of [0.9, 0.1]: e0 and e3


def test_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(filter_logits(logits, top_p=0.75))
    assert kept.tolist() == [[True, True, False, False]]


def test_round_trip_gap():
    v = torch.tensor([[1.0, 0.5]])
    assert round_trip_gap(v, E).item() == pytest.approx(0.5)


def test_policy_threshold_and_budget():
    policy = CollapsePolicy("l2r", threshold=1.0, budget=1)
    v = torch.tensor([[1.0, 0.5], [3.0, 0.0]])
    ids = collapse("nn_l2", v, outs(n=2), E)
    scores = policy.score_of(v, torch.zeros(2, 4), ids, E)
    torch.testing.assert_close(scores, torch.tensor([0.5, 2.0]))
    assert policy.at_entry(scores).tolist() == [False, True]
    # two uncollapsed soft tokens, budget 1: the higher score goes; ties go oldest first
    done = torch.tensor([[False, False, True]])
    assert policy.over_budget(torch.tensor([[0.2, 0.9, 5.0]]), done).tolist() == [[False, True, False]]
    assert policy.over_budget(torch.tensor([[0.5, 0.5, 5.0]]), done).tolist() == [[True, False, False]]
    assert not CollapsePolicy().over_budget(torch.ones(1, 3), torch.zeros(1, 3, dtype=torch.bool)).any()


def test_every_operator_returns_ids_of_the_batch_shape():
    g = torch.Generator().manual_seed(0)
    v, out = torch.randn(3, 2), outs(torch.randn(3, 4), c=torch.randn(3, 2), n=3)
    for kind in COLLAPSES:
        ids = collapse(kind, v, out, E, Sampling(generator=g))
        assert ids.shape == (3,) and ids.dtype == torch.long and ((ids >= 0) & (ids < 4)).all(), kind
