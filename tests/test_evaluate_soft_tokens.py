import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from softar.config import ModelConfig
from softar.data.dataset import random_windows
from softar.evaluate.soft_tokens import brier_lm, feedback_modes, open_loop_loss, soft_output_metrics
from softar.model import Hidden, Outputs, VectorLM
from softar.soft.model import SoftAR
from softar.soft.tokens import SOFT_TOKENS

from .conftest import soft_model


def model_and_data():
    torch.manual_seed(0)
    model = soft_model(ModelConfig(n_layer=1, n_head=2, d_model=16, block_size=12, vocab_size=9,
                                   vector_head=True)).eval()
    data = np.random.default_rng(0).integers(0, 9, 500).astype(np.uint16)
    return model, data


class Oracle(nn.Module):
    """A VectorLM that always puts probability `p` on one token and spreads the rest evenly: E = identity."""

    vector_head = collapse_head = None

    def __init__(self, vocab: int, token: int, p: float):
        super().__init__()
        self.embed = nn.Parameter(torch.eye(vocab))
        probs = torch.full((vocab,), (1 - p) / (vocab - 1))
        probs[token] = p
        self.register_buffer("logp", probs.log())

    @property
    def E(self):
        return self.embed

    def hidden(self, vectors, positions=None, cache=None):
        return Hidden(vectors)

    def heads(self, h):
        return Outputs(logits=self.logp.expand(*h.last.shape[:-1], -1), h_m=h.last)

    def new_cache(self, batch_size, max_len):
        return None

    def flops_per_position(self, context):
        return 0.0


def test_open_loop_with_teacher_feedback_is_the_teacher_forced_loss():
    model, data = model_and_data()
    got = open_loop_loss(model, data, horizon=4, modes=["teacher", "greedy", "soft_regress"], windows=16, seed=3)
    ids = random_windows(data, 13, 16, 3, "cpu")
    logits = model(ids[:, :-1])[:, -4:]  # the last 4 positions predict the last 4 tokens
    ref = F.cross_entropy(logits.flatten(0, 1), ids[:, -4:].flatten())
    assert abs(got["teacher"] - ref.item()) < 1e-5
    assert set(got) == {"teacher", "greedy", "soft_regress"}


def test_soft_output_metrics_match_a_direct_computation():
    model, data = model_and_data()
    m = soft_output_metrics(model, data, windows=8, seed=2)
    assert set(m) == {"lm_top1", *SOFT_TOKENS}  # every registered soft token; this model has a vector head
    ids = random_windows(data, 13, 8, 2, "cpu")
    with torch.no_grad():
        out = model.lm.heads(model.lm.hidden(model.E[ids[:, :-1]]))
    p = out.logits.softmax(-1)
    target = model.E[ids[:, 1:]]
    for kind, v in (("expected", p @ model.E), ("regress", out.y)):
        dist = torch.cdist(v.reshape(-1, v.shape[-1]), model.E)  # nearest embedding, by brute force
        assert m[kind]["nn_top1"] == pytest.approx((dist.argmin(-1) == ids[:, 1:].flatten()).float().mean().item())
        assert m[kind]["cosine"] == pytest.approx(F.cosine_similarity(v, target, dim=-1).mean().item(), abs=1e-6)
        assert m[kind]["l2"] == pytest.approx((v - target).norm(dim=-1).mean().item(), abs=1e-6)
    assert m["lm_top1"] == pytest.approx((out.logits.argmax(-1) == ids[:, 1:]).float().mean().item())


@pytest.mark.parametrize("p, token, expected", [(1.0, 3, 1.0), (1.0, 4, -1.0), (0.5, 3, None)])
def test_brier_on_an_oracle(p, token, expected):
    """Text that is token 3 throughout. A model sure of 3: both draws hit and agree, Brier-n = 1 + 1 - 1 = 1, so
    BrierLM = 100. Sure of 4: both miss and agree, -1, BrierLM 0. Half sure of 3: the estimator is unbiased for
    Brier-1 = 2 P(3) - sum P^2 = 1 - (0.25 + 4 * 0.125^2) = 0.6875 (on 4000 positions, within 4 standard errors)."""
    model = SoftAR(Oracle(5, token, p), 8)
    assert isinstance(model.lm, VectorLM)
    data = np.full(200, 3, dtype=np.uint16)
    b = brier_lm(model, data, windows=4000 if expected is None else 16)
    if expected is not None:
        assert all(b[f"brier{n}"] == expected for n in range(1, 5))
        assert b["brierlm"] == (100.0 if expected == 1 else 0.0)
    else:
        assert abs(b["brier1"] - 0.6875) < 4 * 1.0 / 4000**0.5


def test_feedback_modes_come_from_the_registry():
    model, _ = model_and_data()
    assert feedback_modes(model) == ["teacher", "greedy", "sampled", *(f"soft_{k}" for k in SOFT_TOKENS)]
    oracle = SoftAR(Oracle(5, 3, 0.9), 8)
    assert "soft_regress" not in feedback_modes(oracle) and "soft_moi" in feedback_modes(oracle)
