import numpy as np
import torch
import torch.nn.functional as F

from softar.config import ModelConfig
from softar.evaluate import _windows, brier_lm, open_loop_loss, soft_output_metrics
from softar.model import GPT


def model_and_data():
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=1, n_head=2, d_model=16, block_size=12, vocab_size=9, vector_head=True)).eval()
    data = np.random.default_rng(0).integers(0, 9, 500).astype(np.uint16)
    return model, data


def test_open_loop_with_teacher_feedback_is_the_teacher_forced_loss():
    model, data = model_and_data()
    got = open_loop_loss(model, data, horizon=4, modes=["teacher", "greedy", "soft_regress"], windows=16, seed=3)
    ids = _windows(data, 13, 16, 3, "cpu")
    logits = model(ids[:, :-1])[:, -4:]  # the last 4 positions predict the last 4 tokens
    ref = F.cross_entropy(logits.flatten(0, 1), ids[:, -4:].flatten())
    assert abs(got["teacher"] - ref.item()) < 1e-5
    assert set(got) == {"teacher", "greedy", "soft_regress"}


def test_soft_output_metrics_and_brier_ranges():
    model, data = model_and_data()
    m = soft_output_metrics(model, data, windows=8)
    assert set(m) == {"lm_top1", "expected", "regress"}
    assert 0 <= m["expected"]["nn_top1"] <= 1 and -1 <= m["regress"]["cosine"] <= 1
    b = brier_lm(model, data, windows=32)
    assert all(-1 <= b[f"brier{n}"] <= 2 for n in range(1, 5)) and 0 <= b["brierlm"] <= 100 * 2
