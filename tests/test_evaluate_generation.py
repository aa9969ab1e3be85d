"""softar.evaluate.generation: the reference model's continuation loss and repeated n-grams."""

import math

import pytest
import torch

from softar.config import ModelConfig

from .conftest import soft_model


def test_continuation_loss_and_repeated_ngrams():
    from softar.evaluate.generation import continuation_loss, repeated_ngrams
    from softar.losses import lm_loss

    torch.manual_seed(0)
    ref = soft_model(ModelConfig(n_layer=1, n_head=2, d_model=16, block_size=32, vocab_size=11)).eval()
    ids = torch.randint(11, (2, 20))
    with torch.no_grad():
        expected = lm_loss(ref(ids[:, :-1])[:, 4:], ids[:, 5:]).item()
    assert continuation_loss(ref, ids, 5) == pytest.approx(expected, rel=1e-5)
    # longer than the block: windows slide by 16, and each target is scored once, from the first window holding it
    # (the one starting at s = the smallest multiple of 16 with p - s <= 32), read token by token here
    long = torch.randint(11, (2, 90))
    with torch.no_grad():
        per = [lm_loss(ref(long[:, s:p])[:, -1:], long[:, p : p + 1])
               for p in range(40, 90) for s in [max(0, math.ceil((p - 32) / 16) * 16)]]
    assert continuation_loss(ref, long, 40) == pytest.approx(torch.stack(per).mean().item(), rel=1e-5)
    assert repeated_ngrams(torch.tensor([[1, 2, 3, 4, 1, 2, 3, 4]]), 4) == pytest.approx(1 / 5)
