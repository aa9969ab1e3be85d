import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from softar.config import ModelConfig
from softar.data.dataset import random_windows
from softar.evaluate.soft_tokens import brier_lm, open_loop_loss, soft_kinds, soft_output_metrics
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

    @property
    def width(self):
        return self.embed.shape[1]

    def new_cache(self, batch_size, max_len):
        return None

    def new_ring_cache(self, batch_size, size):
        return None

    def shard_units(self):
        return []

    def checkpoint_activations(self):
        pass

    def describe(self):
        return {"n_layer": 0, "n_head": 0, "d_model": self.width}

    def flops_per_position(self, context):
        return 0.0


def test_open_loop_with_teacher_feedback_is_the_teacher_forced_loss():
    model, data = model_and_data()
    got = open_loop_loss(model, data, horizon=4, windows=16, seed=3)
    ids = random_windows(data, 13, 16, 3, "cpu")
    logits = model(ids[:, :-1])[:, -4:]  # the last 4 positions predict the last 4 tokens
    ref = F.cross_entropy(logits.flatten(0, 1), ids[:, -4:].flatten())
    assert abs(got["teacher"] - ref.item()) < 1e-5
    per_step = F.cross_entropy(logits.flatten(0, 1), ids[:, -4:].flatten(), reduction="none").view(16, 4).mean(0)
    assert got["per_step"]["teacher"] == pytest.approx(per_step.tolist(), abs=1e-5)
    assert np.mean(got["per_window"]["teacher"]) == pytest.approx(got["teacher"], abs=1e-6)
    assert set(SOFT_TOKENS) - set(soft_kinds(model)) == {"collapse"}  # every kind but the collapse head's
    for mode in ("greedy", *(f"sampled_avg_{s}" for s in (1, 2, 4, 16)), "constant_mean", "constant_unigram",
                 "zero", "unigram", *(f"soft_{k}" for k in soft_kinds(model))):
        assert np.isfinite(got[mode]), mode
        if mode != got["soft_feedback"]:
            d = got["vs_soft"][mode]
            assert d["lo"] <= d["diff"] <= d["hi"]
            assert d["diff"] == pytest.approx(got[mode] - got[got["soft_feedback"]], abs=1e-6)


def test_sampled_avg_1_is_the_single_rollout_figure():
    """sampled_avg_1 is what a single sampled rollout reports, against a naive loop written here: every step a full
    forward over the window so far and a token drawn from its distribution (one stream for all windows, seed 4)."""
    model, data = model_and_data()
    got = open_loop_loss(model, data, horizon=5, windows=16, seed=4)
    ids = random_windows(data, 13, 16, 4, "cpu")
    E, prefix = model.E, 12 - 5
    gen = torch.Generator().manual_seed(4)
    window = E[ids[:, : prefix + 1]]
    losses = []
    with torch.no_grad():
        for k in range(5):
            logits = model.lm.heads(model.lm.hidden(window)).logits[:, -1]
            losses.append(F.cross_entropy(logits, ids[:, prefix + 1 + k]))
            drawn = torch.multinomial(logits.float().softmax(-1), 1, generator=gen)  # [16, 1]
            window = torch.cat([window, E[drawn]], dim=1)
    assert got["sampled_avg_1"] == pytest.approx(torch.stack(losses).mean().item(), abs=1e-5)
    assert got["sampled_avg_16"] < got["sampled_avg_1"]  # averaging probabilities can only help on average


def test_averaging_identical_rollouts_changes_nothing():
    """A model whose distribution ignores its context makes every rollout identical, so the loss of the mean
    probability over S rollouts is the single rollout's, for every S, and soft feedback matches one rollout."""
    model = SoftAR(Oracle(5, 3, 0.6), 12)
    data = np.random.default_rng(0).integers(0, 5, 300).astype(np.uint16)
    got = open_loop_loss(model, data, horizon=4, windows=8)
    for s in (2, 4, 16):
        assert got[f"sampled_avg_{s}"] == pytest.approx(got["sampled_avg_1"], abs=1e-6)
    assert got["soft_expected"] == pytest.approx(got["sampled_avg_1"], abs=1e-6)


def test_effective_samples_interpolates_in_log_s():
    from softar.evaluate.soft_tokens import effective_samples

    losses = {1: 4.0, 2: 3.0, 4: 2.0, 16: 1.0}
    assert effective_samples(losses, 3.0) == (2.0, "within")
    assert effective_samples(losses, 2.5) == (pytest.approx(2 ** 1.5), "within")
    assert effective_samples(losses, 1.5) == (pytest.approx(8.0), "within")
    assert effective_samples(losses, 4.5) == (1.0, "below")
    assert effective_samples(losses, 0.5) == (16.0, "above")
    # more rollouts never do worse: a noisy rise is read on the running minimum
    noisy = {1: 3.0, 2: 3.1, 4: 2.9, 16: 2.95}
    assert effective_samples(noisy, 2.92) == (pytest.approx(2 ** 1.8), "within")
    assert effective_samples(noisy, float("nan")) == (None, "undefined")


def test_greedy_calibration_and_unigram_use_train():
    from softar.evaluate.soft_tokens import unigram

    model, data = model_and_data()
    train = np.random.default_rng(1).integers(0, 9, 500).astype(np.uint16)
    got = open_loop_loss(model, data, horizon=4, train_data=train, windows=16, seed=3)
    assert got["greedy_temperature"] > 0 and np.isfinite(got["greedy_calibrated"])
    ids = random_windows(data, 13, 16, 3, "cpu")
    prior = unigram(train, 9)
    assert prior.sum().item() == pytest.approx(1.0)
    assert got["unigram"] == pytest.approx(-prior.log()[ids[:, -4:]].mean().item(), abs=1e-6)


def test_fit_temperature_recovers_a_known_temperature():
    from softar.losses import fit_temperature

    g = torch.Generator().manual_seed(0)
    z = torch.randn(20000, 12, generator=g) * 3
    y = torch.multinomial((z / 2.5).softmax(-1), 1, generator=g).squeeze(-1)
    assert fit_temperature(z, y) == pytest.approx(2.5, rel=0.05)


def test_paired_bootstrap_interval():
    from softar.evaluate.stats import paired_bootstrap

    rng = np.random.default_rng(0)
    base = rng.normal(size=400)
    d = paired_bootstrap(base + 0.5 + rng.normal(scale=0.1, size=400), base)
    assert d["lo"] < 0.5 < d["hi"] and d["hi"] - d["lo"] < 0.05  # pairing removes the shared variation
    same = paired_bootstrap(base, base)
    assert same == {"diff": 0.0, "lo": 0.0, "hi": 0.0}


def test_soft_output_metrics_match_a_direct_computation():
    from softar.evaluate.soft_tokens import nn_spacing

    model, data = model_and_data()
    m = soft_output_metrics(model, data, windows=8, seed=2)
    assert set(m) == {"lm_top1", "nn_spacing", *soft_kinds(model)}  # every kind it can make (it has a vector head)
    ids = random_windows(data, 13, 8, 2, "cpu")
    with torch.no_grad():
        out = model.lm.heads(model.lm.hidden(model.E[ids[:, :-1]]))
    p = out.logits.softmax(-1)
    target = model.E[ids[:, 1:]]
    E = model.E.detach()
    brute = [min(torch.dist(E[i], E[j]).item() for j in range(9) if j != i) for i in range(9)]
    assert m["nn_spacing"] == pytest.approx(nn_spacing(E)) == pytest.approx(np.mean(brute), rel=1e-5)
    for kind, v in (("expected", p @ model.E), ("regress", out.y)):
        dist = torch.cdist(v.reshape(-1, v.shape[-1]), model.E)  # nearest embedding, by brute force
        assert m[kind]["nn_top1"] == pytest.approx((dist.argmin(-1) == ids[:, 1:].flatten()).float().mean().item())
        assert m[kind]["cosine"] == pytest.approx(F.cosine_similarity(v, target, dim=-1).mean().item(), abs=1e-6)
        assert m[kind]["l2"] == pytest.approx((v - target).norm(dim=-1).mean().item() / m["nn_spacing"], abs=1e-6)
        assert m[kind]["l2_r"] == pytest.approx(dist.min(-1).values.mean().item() / m["nn_spacing"], abs=1e-5)
    assert m["lm_top1"] == pytest.approx((out.logits.argmax(-1) == ids[:, 1:]).float().mean().item())


@pytest.mark.parametrize("p, token, expected", [(1.0, 3, 1.0), (1.0, 4, -1.0)])
def test_brier_on_a_certain_oracle(p, token, expected):
    """Text that is token 3 throughout. A model sure of 3: Brier-n = 2 P(y) - sum P^2 = 2 - 1 = 1, BrierLM 100.
    Sure of 4: 0 - 1 = -1 for every n, and BrierLM (a geometric mean) is undefined, reported as unresolved."""
    model = SoftAR(Oracle(5, token, p), 8)
    assert isinstance(model.lm, VectorLM)
    b = brier_lm(model, np.full(200, 3, dtype=np.uint16), windows=16)
    assert all(b[f"brier{n}"] == expected and b[f"brier{n}_se"] == 0 for n in range(1, 5))
    assert b["positions_per_window"] == 5  # every position whose 4 next tokens lie in the 8-slot window
    if expected == 1:
        assert b["brierlm"] == pytest.approx(100.0) and b["unresolved"] == []
    else:
        assert b["brierlm"] is None and "brierlm" in b["unresolved"]


def test_brier_exact_and_sampled_forms_agree_on_a_fixed_distribution():
    """Half sure of 3 on text of 3s: Brier-1 = 2 P(3) - sum P^2 = 1 - (0.25 + 4 * 0.125^2) = 0.6875 exactly, and the
    classic sampled estimate 1[x1 = y] + 1[x2 = y] - 1[x1 = x2] agrees within its error. Brier-2 (sampled path)
    is unbiased for 2 * 0.5^2 - 0.3125^2."""
    model = SoftAR(Oracle(5, 3, 0.5), 8)
    b = brier_lm(model, np.full(200, 3, dtype=np.uint16), windows=400)
    assert b["brier1"] == pytest.approx(0.6875, abs=1e-6)
    probs = torch.tensor([0.125, 0.125, 0.125, 0.5, 0.125])
    g = torch.Generator().manual_seed(0)
    x1, x2 = (torch.multinomial(probs, 20000, replacement=True, generator=g) for _ in range(2))
    sampled = ((x1 == 3).float() + (x2 == 3).float() - (x1 == x2).float())
    se = sampled.std().item() / len(sampled) ** 0.5
    assert abs(sampled.mean().item() - b["brier1"]) < 4 * se
    assert abs(b["brier2"] - (0.5 - 0.3125**2)) < 4 * b["brier2_se"] + 1e-9
    assert b["brier2_se"] > 0


def test_brier_of_the_shown_text_for_every_feedback_mode():
    model, data = model_and_data()
    got = open_loop_loss(model, data, horizon=4, windows=16, seed=3)["brier_shown"]
    assert set(got) == {"greedy", "sampled", "constant_mean", "constant_unigram", "zero",
                        *(f"soft_{k}" for k in soft_kinds(model))}
    for cell in got.values():
        assert all(-1 <= cell[f"brier{n}"] <= 1 and cell[f"brier{n}_se"] >= 0 for n in range(1, 5))
    oracle = SoftAR(Oracle(5, 3, 1.0), 12)  # certain and right: every mode shows the truth
    shown = open_loop_loss(oracle, np.full(300, 3, dtype=np.uint16), horizon=4, windows=8)["brier_shown"]
    assert all(c[f"brier{n}"] == pytest.approx(1.0) for c in shown.values() for n in range(1, 5))


def test_feedback_modes_come_from_the_registry():
    oracle = SoftAR(Oracle(5, 3, 0.9), 8)  # no vector head: every soft token but regress
    got = open_loop_loss(oracle, np.full(100, 3, dtype=np.uint16), horizon=2, windows=4)
    assert "soft_regress" not in got and "soft_moi" in got


def test_regression_only_models_are_read_through_the_cosine_readout():
    """A model trained with ce weight 0 never trained its LM head: evaluation reads softmax(cos(y, E) / tau), tau
    fitted on train windows, and every metric (open loop included) goes through it."""
    from softar.config import LossConfig

    from .conftest import soft_model

    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=1, n_head=2, d_model=16, block_size=12, vocab_size=9, vector_head=True)
    model = soft_model(cfg, loss=LossConfig(ce=0.0, mse=1.0)).eval()
    assert model.regression_only and not soft_model(cfg).regression_only
    train = np.random.default_rng(1).integers(0, 9, 500).astype(np.uint16)
    tau = model.fit_cosine_readout(train, windows=8, seed=0)
    assert tau == model.cosine_readout > 0
    x = torch.randint(0, 9, (2, 5))
    with torch.no_grad():
        out = model.lm.heads(model.lm.hidden(model.E[x]))
        cos = F.cosine_similarity(out.y[..., None, :], model.E, dim=-1)
        assert torch.allclose(model(x), cos / model.cosine_readout, atol=1e-5)
    assert np.isfinite(open_loop_loss(model, train, horizon=3, windows=4)["soft_regress"])


def test_fit_temperature_returns_its_bound_when_the_data_asks_for_more():
    from softar.evaluate.stats import at_bound
    from softar.losses import fit_temperature

    z = torch.tensor([[5.0, 0.0], [0.0, 5.0]]).repeat(50, 1)
    y = torch.tensor([1, 0]).repeat(50)  # always wrong: the flatter the better, without end
    tau = fit_temperature(z, y)
    assert at_bound(tau) and tau > 1e3
    assert not at_bound(fit_temperature(z, torch.tensor([0, 1, 1, 0]).repeat(25)))
