"""softar.evaluate.context: the last hard slot's prediction, the recovery and passkey probes."""

import numpy as np
import torch

from softar.config import ModelConfig

from .conftest import soft_model
from .test_soft_window import tiny_layout_model


def test_layout_greedy_generation_matches_the_training_time_window():
    """With no soft slots, each greedy step's token is the argmax the training-time context builder gives for the
    same text (hard region = the newest tokens, history = everything before)."""
    from softar.evaluate.context import last_hard_logits
    from softar.generate import Decoding, generate

    model = tiny_layout_model(op="sqrt")
    prompt = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1, 2, 3, 4]])
    out = generate(model, prompt, Decoding(temperature=0, max_new_tokens=12)).full()
    for t in range(prompt.shape[1], out.shape[1]):
        assert last_hard_logits(model, out[:, :t]).argmax(-1).item() == out[0, t].item()


def test_recovery_probe_reads_back_an_orthonormal_sum():
    from softar.evaluate.context import recovery_probe

    model = tiny_layout_model(op="sum", segment_len=4)
    with torch.no_grad():
        model.E.copy_(torch.eye(11, 16))  # orthonormal rows: a sum is read back exactly
    data = np.random.default_rng(0).integers(0, 11, 400).astype(np.uint16)
    result = recovery_probe(model, data, history_lengths=(8, 20), windows=6)
    assert result["8"]["segment"]["recall_at_k"] == 1.0 and "aggregate" not in result["8"]
    assert result["20"]["aggregate"]["recall_at_k"] == 1.0


def test_passkey_outside_the_window_changes_nothing():
    from softar.evaluate.context import passkey_probe

    torch.manual_seed(0)
    model = soft_model(ModelConfig(n_layer=1, n_head=2, d_model=16, block_size=8, vocab_size=11)).eval()
    data = np.random.default_rng(0).integers(0, 11, 400).astype(np.uint16)
    result = passkey_probe(model, data, distances=(3, 20), windows=8)
    assert result["20"]["logp_gain"] == 0.0 and result["3"]["logp_gain"] != 0.0
