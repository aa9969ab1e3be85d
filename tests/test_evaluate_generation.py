"""softar.evaluate.generation: the reference model's continuation loss and repeated n-grams."""

import math

import numpy as np
import pytest
import torch

from softar.config import ModelConfig
from softar.soft.model import SoftAR

from .conftest import decoding, soft_model


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


def test_distinct_ngrams_and_frontier_gap():
    from softar.evaluate.generation import distinct_ngrams, frontier_gap

    assert distinct_ngrams(torch.tensor([[1, 2, 1, 2, 1]]), 2) == pytest.approx(2 / 4)
    frontier = [{"distinct_2": 0.2, "reference_ppl": 10.0}, {"distinct_2": 0.6, "reference_ppl": 30.0}]
    assert frontier_gap(frontier, {"distinct_2": 0.4, "reference_ppl": 15.0}) == pytest.approx(-5.0)
    assert frontier_gap(frontier, {"distinct_2": 0.9, "reference_ppl": 15.0}) is None
    # a dominated plain-sampling point is not the frontier: (0.7, 12) is more diverse and more coherent than (0.6, 30)
    frontier = [{"distinct_2": x, "reference_ppl": y} for x, y in ((0.5, 10.0), (0.6, 30.0), (0.7, 12.0))]
    assert frontier_gap(frontier, {"distinct_2": 0.6, "reference_ppl": 20.0}) == pytest.approx(9.0)


def test_keep_uncertain_turns_the_policy_round():
    from softar.soft.collapse import CollapsePolicy

    scores = torch.tensor([0.5, 2.0, 4.0])
    assert CollapsePolicy(threshold=1.0).at_entry(scores).tolist() == [False, True, True]
    assert CollapsePolicy(threshold=1.0, keep_uncertain=True).at_entry(scores).tolist() == [True, False, False]
    done = torch.zeros(1, 3, dtype=torch.bool)
    keep = CollapsePolicy(budget=1, keep_uncertain=True).over_budget(scores[None], done)
    assert keep.tolist() == [[True, True, False]]  # the most uncertain stays soft


def test_shown_brier_scores_any_decoding_the_same_way():
    """A plain model on text it knows exactly shows the truth every draw (Brier 1); greedy decoding of a wrong
    certain guess scores -1; the estimate for a spread-out sampler lies in between."""
    from softar.evaluate.generation import shown_brier

    from .test_evaluate_soft_tokens import Oracle

    prompts = torch.full((6, 4), 3)
    truth = torch.full((6, 2), 3)
    right, wrong = (SoftAR(Oracle(5, t, 1.0), 8) for t in (3, 4))
    assert shown_brier(right, prompts, truth, decoding(mode="hard")) == (1.0, 0.0)
    assert shown_brier(wrong, prompts, truth, decoding(mode="hard", temperature=0)) == (-1.0, 0.0)
    half = SoftAR(Oracle(5, 3, 0.5), 8)
    mean, se = shown_brier(half, prompts, truth, decoding(mode="hard"), draws=64)
    assert abs(mean - (2 * 0.25 - 0.3125**2)) < 4 * se + 0.05 and se > 0


def test_generation_report_has_the_frontier_and_both_policies():
    from softar.config import ContextConfig, ModelConfig
    from softar.evaluate.generation import FRONTIER, generation_report

    from .conftest import soft_model

    torch.manual_seed(0)
    gen = soft_model(ModelConfig(n_layer=1, n_head=2, d_model=16, block_size=12, vocab_size=9),
                     ContextConfig(segments=1, soft=3, segment_len=4)).eval()
    ref = soft_model(ModelConfig(n_layer=1, n_head=2, d_model=16, block_size=8, vocab_size=9)).eval()
    data = np.random.default_rng(0).integers(0, 9, 400).astype(np.uint16)
    rows = generation_report(gen, ref, data, thresholds=(0.0, float("inf")), prompts=4, prompt_len=6,
                             new_tokens=8)
    assert set(rows) == {"frontier", "collapse_uncertain", "keep_uncertain"} and len(rows["frontier"]) == len(FRONTIER)
    assert all(r["soft_fraction"] == 0 for r in rows["frontier"])
    cu, ku = rows["collapse_uncertain"], rows["keep_uncertain"]
    assert cu[0]["soft_fraction"] == 0 and ku[-1]["soft_fraction"] == 0  # every token collapsed: plain sampling
    assert cu[-1]["soft_fraction"] > 0 and ku[0]["soft_fraction"] > 0
    for r in cu + ku:
        assert {"reference_ppl", "distinct_2", "distinct_3", "brier2", "brier2_se"} <= set(r)
