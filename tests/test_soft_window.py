"""The context layout: slot computation against a slow reference, the generation-time memory hierarchy's bookkeeping,
collapse policies, and layout models in training, evaluation and generation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from softar.config import ContextConfig, ModelConfig
from softar.data.dataset import WindowSampler, sequential_windows
from softar.soft.collapse import OOD_SCORES, CollapsePolicy, budget_collapse
from softar.soft.model import SoftAR
from softar.soft.window import ContextState, Layout, WindowBuilder, normalize, summary_slots, summary_weights

from .conftest import decoding, soft_model


def layout(block=16, **ctx) -> Layout:
    return Layout.from_config(ContextConfig(**ctx), block)


def reference_slots(E: torch.Tensor, hist: torch.Tensor, hist_len: torch.Tensor, lay: Layout) -> torch.Tensor:
    """The summary slots by their definition, one token at a time."""
    B, n = hist.shape
    out = torch.zeros(B, lay.n_summary, E.shape[1], dtype=torch.float64)
    for b in range(B):
        for s, (lo, hi) in enumerate(lay.slot_ranges()):
            total, count = torch.zeros(E.shape[1], dtype=torch.float64), 0
            for j in range(n):
                age = n - 1 - j
                if age < hist_len[b] and lo <= age < hi:
                    w = lay.decay ** (age - lo) if lay.op == "decay" else 1.0
                    total += w * E[hist[b, j]].double()
                    count += 1
            if lay.op == "mean" and count:
                total /= count
            elif lay.op == "sqrt" and count:
                total /= math.sqrt(count)
            out[b, s] = total
    return out


OPS = ["sum", "mean", "sqrt", "decay"]


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("aggregate_all", [False, True])
def test_batched_slots_equal_a_slow_reference_loop(op, aggregate_all):
    g = torch.Generator().manual_seed(0)
    lay = layout(block=24, aggregate=1, segments=3, segment_len=2, segment_growth=2, op=op, decay=0.9,
                 aggregate_all=aggregate_all, max_history=40)
    E = torch.randn(11, 5, generator=g)
    hist = torch.randint(11, (6, 40), generator=g)
    hist_len = torch.tensor([0, 1, 5, 14, 15, 40])  # empty, inside segment 0, at segment edges, all
    got = summary_slots(E, hist, hist_len, lay)
    assert got.shape == (6, 4, 5)
    torch.testing.assert_close(got.double(), reference_slots(E, hist, hist_len, lay), atol=1e-5, rtol=1e-5)
    assert (got[0] == 0).all()  # no history: empty slots


def test_slots_are_differentiable_in_E():
    lay = layout(aggregate=1, segments=1, segment_len=2, op="mean", max_history=8)
    E = torch.randn(7, 3, requires_grad=True)
    hist = torch.tensor([[6, 6, 6, 1, 2]])
    summary_slots(E, hist, torch.tensor([5]), lay).sum().backward()
    assert (E.grad[6] != 0).all() and (E.grad[1] != 0).all() and (E.grad[0] == 0).all()


def test_slot_order_and_tiers_of_the_seed_layout():
    lay = layout(block=128, aggregate=1, segments=2, soft=28, segment_len=64)
    assert (lay.aggregate, lay.segments, lay.hard, lay.soft, lay.token_slots) == (1, (64, 64), 97, 28, 125)
    assert lay.slot_ranges() == [(128, math.inf), (64, 128), (0, 64)]  # window order: oldest first
    builder = WindowBuilder(lay, 4, kind_embeddings=True, project=False)
    with torch.no_grad():
        builder.kind.weight.copy_(torch.arange(4.0)[:, None].expand(4, 4))  # kind i adds the vector (i, i, i, i)
    window = builder(torch.zeros(1, 3, 4), torch.zeros(1, 125, 4), 28)
    assert window[0, :, 0].tolist() == [0, 1, 1] + [2] * 97 + [3] * 28
    assert layout(block=8).plain and layout(block=8).n_summary == 0


def push_hard(state: ContextState, E: torch.Tensor, ids: list[int]) -> None:
    for i in ids:
        t = torch.tensor([i])
        state.push(E[t], t, torch.tensor([True]), torch.zeros(1), E)


def test_eviction_order_moves_each_token_one_step_down_the_ladder():
    lay = layout(block=8, aggregate=1, segments=2, soft=2, segment_len=2, segment_growth=2, op="sum")
    assert (lay.hard, lay.segments) == (3, (2, 4))
    V = 40
    E = torch.eye(V)
    state = ContextState(lay, 1, V, V, dtype=torch.float64)
    for n in range(1, 31):
        push_hard(state, E, [n - 1])  # token ids are their push order
        seen = list(range(n))
        assert state.soft_id[0].tolist() == seen[-2:]
        assert state.hard[0].tolist() == seen[-5:-2]
        assert state.seg[0].tolist() == seen[max(0, n - 11) : max(0, n - 5)]
        in_agg = seen[: max(0, n - 11)]
        assert state.agg[0].nonzero().flatten().tolist() == in_agg and state.agg_n == len(in_agg)
        spans = {name: seen[n - hi : n - lo] for name, lo, hi in state.regions()}  # ages -> the tokens held
        assert spans["soft"] == state.soft_id[0].tolist() and spans["hard"] == state.hard[0].tolist()
        assert spans["segment1"] + spans["segment0"] == state.seg[0].tolist() and spans["aggregate"] == in_agg
    tiers = [state.tier(age) for age in range(30)]
    assert tiers == ["soft"] * 2 + ["hard"] * 3 + ["segment0"] * 2 + ["segment1"] * 4 + ["aggregate"] * 19
    assert state.tier(30) == "gone"


@pytest.mark.parametrize("op", ["sum", "mean", "sqrt"])
def test_mass_is_conserved(op):
    """With weight-one slots, the slots' contents add up to every token seen (collapsed ids for soft tokens that
    were collapsed, soft vectors for those still soft): as token counts exactly, and as vectors."""
    g = torch.Generator().manual_seed(1)
    lay = layout(block=10, aggregate=1, segments=2, soft=3, segment_len=2, op=op)
    V, m, B = 13, 4, 2
    E = torch.randn(V, m, generator=g, dtype=torch.float64)
    state = ContextState(lay, B, V, m, dtype=torch.float64)
    prompt = torch.randint(V, (B, 7), generator=g)
    state.extend_hard(prompt)
    ids = [prompt]
    for _ in range(40):
        nxt = torch.randint(V, (B,), generator=g)
        soft = torch.randn(B, m, generator=g, dtype=torch.float64)
        collapsed = torch.rand(B, generator=g) < 0.3
        state.push(soft, nxt, collapsed, torch.rand(B, generator=g), E, CollapsePolicy(budget=2))
        ids.append(nxt[:, None])
    ids = torch.cat(ids, dim=1)
    assert state.seen == ids.shape[1] == 47
    expected = torch.zeros(B, V, dtype=torch.float64).scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.float64))
    assert torch.equal(state.token_counts(), expected)
    # vectors: summary slots un-normalised + hard embeddings + soft-region vectors
    W, _ = state.summary_weights()
    total = (W @ E).sum(1) + E[state.hard].sum(1) + state.soft_vec.sum(1)
    done = state.soft_done
    truth = E[ids[:, : -lay.soft]].sum(1) + torch.where(done[..., None], E[state.soft_id], state.soft_vec).sum(1)
    torch.testing.assert_close(total, truth)
    assert ((~done).sum(1) <= 2).all()  # the budget


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("aggregate_all", [False, True])
def test_generation_state_gives_the_training_time_slots(op, aggregate_all):
    g = torch.Generator().manual_seed(2)
    lay = layout(block=12, aggregate=1, segments=2, soft=2, segment_len=3, segment_growth=2, op=op, decay=0.8,
                 aggregate_all=aggregate_all)
    V, m, B = 17, 6, 3
    E = torch.randn(V, m, generator=g)
    state = ContextState(lay, B, V, m)
    seq = torch.randint(V, (B, 50), generator=g)
    state.extend_hard(seq[:, :20])  # a prompt, in bulk
    for t in range(20, 50):  # then one token at a time, collapsed
        state.push(E[seq[:, t]], seq[:, t], torch.ones(B, dtype=torch.bool), torch.zeros(B), E)
    summary, tokens, n_soft = state.window(E)
    history = seq[:, : -lay.token_slots]  # everything older than the hard region
    expected = summary_slots(E, history, torch.full((B,), history.shape[1]), lay)
    torch.testing.assert_close(summary, expected, atol=1e-5, rtol=1e-5)
    assert n_soft == lay.soft and torch.equal(tokens, E[seq[:, -lay.token_slots :]])


def test_budget_collapses_the_most_out_of_distribution_first():
    scores = torch.tensor([[0.5, 2.0, 1.0, 2.0], [1.0, 1.0, 1.0, 1.0]])
    done = torch.tensor([[False, False, False, False], [True, False, False, False]])
    assert budget_collapse(scores, done, 2).tolist() == [[False, True, False, True], [False, True, False, False]]
    assert not budget_collapse(scores, done, 4).any()
    assert budget_collapse(scores, done, 0).tolist() == (~done).tolist()


def test_ood_scores_on_hand_built_cases():
    E = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    v = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    logits = torch.tensor([[0.0, 0.0], [10.0, -10.0]])
    ent = OOD_SCORES["entropy"].fn(v, logits, torch.tensor([0, 0]), E)
    torch.testing.assert_close(ent[0], torch.tensor(math.log(2)))
    assert ent[1] < 1e-6
    torch.testing.assert_close(OOD_SCORES["l2r"].fn(v, logits, torch.tensor([1, 1]), E),
                               torch.tensor([math.sqrt(0.5), math.sqrt(2)]))
    torch.testing.assert_close(OOD_SCORES["nn_dist"].fn(v, logits, torch.tensor([1, 1]), E),
                               torch.tensor([math.sqrt(0.5), 0.0]))


def test_threshold_policy_collapses_in_place():
    lay = layout(block=6, soft=3)
    E = torch.eye(4)
    state = ContextState(lay, 2, 4, 4)
    soft = torch.full((2, 4), 0.25)
    state.push(soft, torch.tensor([1, 2]), torch.tensor([True, False]), torch.tensor([3.0, 0.1]), E)
    assert state.soft_done.tolist() == [[True], [False]]
    assert torch.equal(state.soft_vec[0, 0], E[1]) and torch.equal(state.soft_vec[1, 0], soft[1])
    assert state.collapsed_by_policy.tolist() == [1, 0]


def tiny_layout_model(**ctx) -> SoftAR:
    torch.manual_seed(0)
    ctx = {"aggregate": 1, "segments": 2, "segment_len": 3, "max_history": 30, **ctx}
    cfg = ModelConfig(n_layer=2, n_head=2, d_model=16, block_size=12, vocab_size=11)
    return soft_model(cfg, context=ContextConfig(**ctx)).eval()


def test_layout_soft_generation_is_deterministic_and_reports_the_policy():

    model = tiny_layout_model(soft=3)
    prompt = torch.tensor([[1, 2, 3]])
    dec = decoding(mode="soft", collapse="lm_sample", policy=CollapsePolicy("entropy", 2.3), max_new_tokens=30)
    runs = [dec.run(model, prompt, seed=5) for _ in range(2)]
    assert torch.equal(runs[0].tokens, runs[1].tokens)
    g = runs[0]
    assert torch.equal(g.collapsed[:, :27], g.scores[:, :27] > 2.3)
    assert g.tiers[0][-3:] == ["soft"] * 3 and g.tiers[0][-4] == "hard"


@pytest.mark.parametrize("project, kinds", [(False, True), (True, False)])
def test_training_step_with_a_layout_reaches_E_through_the_history(project, kinds):
    model = tiny_layout_model(soft=2, project=project, kind_embeddings=kinds).train()
    assert (model.slots.kind is not None) == kinds and (model.slots.proj is not None) == project
    x = torch.randint(11, (2, 9))
    hist = torch.full((2, 30), 10)  # token 10 only in the history
    x[x == 10] = 0
    loss, parts = model(x, targets=torch.randint(10, (2, 9)), history=(hist, torch.tensor([30, 5])))
    loss.backward()
    assert torch.isfinite(loss) and set(parts) == {"ce"}
    assert model.E.grad[10].abs().sum() > 0
    if project:  # a projected slot starts at the scale of a token embedding, and the projection learns
        assert model.slots.proj["aggregate"][0].weight.grad.abs().sum() > 0
        assert torch.equal(model.slots.proj["segment"][1].weight, torch.full((16,), 0.02))


def test_sampler_history_is_the_text_before_each_window():
    data = np.arange(1000, dtype=np.uint16)
    s = WindowSampler(data, 8, 5, seed=3, history=20)
    x, y, hist, lens = s.next_batch()
    assert torch.equal(hist[:, -1] + 1, x[:, 0]) and torch.equal(hist[:, 1:] - hist[:, :-1], torch.ones(5, 19).long())
    assert ((lens >= 0) & (lens <= 20)).all()
    state = s.state()
    again = WindowSampler(data, 8, 5, seed=0, history=20)
    again.load_state(state)
    assert all(torch.equal(a, b) for a, b in zip(s.next_batch(), again.next_batch(), strict=True))
    with pytest.raises(Exception, match="context.max_history"):
        WindowSampler(data[:25], 8, 5, seed=0, history=20)


def test_sequential_windows_with_history():
    data = np.arange(50, dtype=np.uint16)
    batches = list(sequential_windows(data, 8, 4, history=10))
    for x, _, hist, lens in batches:
        for row in range(x.shape[0]):
            start = x[row, 0].item()
            assert lens[row].item() == min(start, 10)
            assert hist[row, 10 - lens[row] :].tolist() == list(range(start - lens[row].item(), start))
    assert sum(x.numel() for x, *_ in batches) == 49


def test_normalize_leaves_empty_slots_at_zero():
    W = torch.tensor([[[2.0, 2.0], [0.0, 0.0]]])
    counts = torch.tensor([[4, 0]])
    assert normalize(W, counts, "mean").tolist() == [[[0.5, 0.5], [0.0, 0.0]]]
    assert normalize(W, counts, "sqrt").tolist() == [[[1.0, 1.0], [0.0, 0.0]]]
    W2, c2 = summary_weights(torch.tensor([[3, 3, 1]]), torch.tensor([3]), layout(aggregate=1, segments=1,
                                                                                 segment_len=1), 4)
    assert W2.tolist() == [[[0, 0, 0, 2], [0, 1, 0, 0]]] and c2.tolist() == [[2, 1]]


def test_layout_without_soft_slots_samples_softly():
    """With no soft slots every generated token is collapsed as it enters: the trace holds its embedding, and a
    threshold decision is still recorded as the policy's."""

    model = tiny_layout_model()
    dec = decoding(mode="soft", collapse="lm_argmax", policy=CollapsePolicy(threshold=0.0), max_new_tokens=6)
    g = dec.run(model, torch.tensor([[1, 2, 3]]), return_vectors=True)
    assert torch.equal(g.vectors[0], model.E[g.tokens[0]])
    assert g.collapsed.all() and "soft" not in g.tiers[0]
