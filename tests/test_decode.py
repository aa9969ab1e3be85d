"""The decode loop: batched equals one at a time, log-probabilities equal a teacher-forced forward, the
block-cached hierarchy equals its recomputation at every step, B = 1 reproduces the per-token hierarchy as it was,
and stop tokens end sequences on their own."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from softar.config import ContextConfig, ModelConfig, SoftConfig
from softar.soft.collapse import CollapsePolicy
from softar.soft.model import SoftAR
from softar.soft.window import ContextState, Layout

from .conftest import FIXTURES, decoding, soft_model

V = 40


def model(block: int = 16, pos_emb: str = "learned", **ctx) -> SoftAR:
    """A small random model whose weights are large enough that its greedy text varies (and small enough that
    rounding differences stay at rounding size over a few dozen soft steps)."""
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_head=2, d_model=16, block_size=block, vocab_size=V, pos_emb=pos_emb)
    if ctx:
        ctx = {"aggregate": 1, "segments": 2, "segment_len": 3, "max_history": 30, **ctx}
    m = soft_model(cfg, context=ContextConfig(**ctx)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return m


PLAIN = {}
SEED_LIKE = {"soft": 4, "shift_every": 3}  # the seed's ladder in a 16-slot window, moving 3 tokens at a time
NO_SOFT = {"soft": 0, "shift_every": 4, "op": "decay", "aggregate_all": True}
DECODINGS = {
    "hard_greedy": decoding(mode="hard", temperature=0),
    "hard_sampled": decoding(mode="hard", temperature=1.0, top_p=0.9),
    "soft_sampled": decoding(mode="soft", temperature=1.0, collapse="lm_sample", soft=SoftConfig(kind="gated"),
                             policy=CollapsePolicy("entropy", 3.0, budget=2)),
    "soft_noisy": decoding(mode="soft", temperature=0.8, collapse="lm_sample",
                           soft=SoftConfig(kind="expected", noise="gaussian", noise_scale=0.5)),
}


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(V, (n,), generator=g).tolist() for n in (5, 1, 9, 5, 30)]  # 30 > the window


@pytest.mark.parametrize("ctx", [PLAIN, SEED_LIKE, NO_SOFT], ids=["plain", "seed_like", "no_soft"])
@pytest.mark.parametrize("dec", list(DECODINGS), ids=list(DECODINGS))
def test_batched_generation_equals_one_at_a_time(ctx, dec):
    m = model(**ctx)
    d = DECODINGS[dec]
    d = replace(d, max_new_tokens=25)
    batch = d.run(m, prompts(), seed=10, return_vectors=True)
    for i, p in enumerate(prompts()):
        alone = d.run(m, [p], seed=10 + i, return_vectors=True)
        assert batch.tokens[i].tolist() == alone.tokens[0].tolist()
        assert torch.equal(batch.collapsed[i], alone.collapsed[0])
        torch.testing.assert_close(batch.logprobs[i], alone.logprobs[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(batch.vectors[i], alone.vectors[0], atol=1e-5, rtol=1e-5)
        if batch.tiers is not None:
            assert batch.tiers[i] == alone.tiers[0]


@pytest.mark.parametrize("mode", ["hard", "soft"])
@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
def test_logprobs_equal_a_teacher_forced_forward(mode, pos_emb):
    m = model(block=64, pos_emb=pos_emb)  # no window slides: one forward sees everything
    d = decoding(mode=mode, temperature=1.0, collapse="lm_sample", max_new_tokens=20)
    g = d.run(m, prompts()[:4], seed=4, return_vectors=True)
    for i, p in enumerate(prompts()[:4]):
        x = torch.cat([m.E[torch.tensor(p)], g.vectors[i, :-1]])  # what the model read, soft or hard
        logp = m.lm.heads(m.lm.hidden(x[None])).logits[0, len(p) - 1 :].log_softmax(-1)
        expected = logp.gather(-1, g.tokens[i, :, None])[:, 0]
        torch.testing.assert_close(g.logprobs[i], expected, atol=1e-5, rtol=1e-5)
        if mode == "hard":
            assert torch.equal(g.vectors[i], m.E[g.tokens[i]])


@pytest.mark.parametrize("ctx", [SEED_LIKE, {**SEED_LIKE, "shift_every": 4}, {**SEED_LIKE, "shift_every": 1}, NO_SOFT,
                                 PLAIN], ids=["B3", "B4=K", "B1", "no_soft", "plain"])
@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
def test_block_cached_generation_equals_its_recomputation_at_every_step(ctx, pos_emb):
    m = model(pos_emb=pos_emb, **ctx)
    for d in DECODINGS.values():
        d = replace(d, max_new_tokens=40)  # the windows move several times
        cached, recomputed = (d.run(m, prompts(), seed=2, use_cache=c) for c in (True, False))
        assert torch.equal(cached.tokens, recomputed.tokens) and torch.equal(cached.collapsed, recomputed.collapsed)
        torch.testing.assert_close(cached.logprobs, recomputed.logprobs, atol=1e-5, rtol=1e-5)  # at every step


def test_per_token_hierarchy_reproduces_the_code_before_block_moves():
    """tests/fixtures/per_token_hierarchy.json holds what the per-token hierarchy generated before the engine (commit
    376c44c): greedy ids and in-place collapse decisions of random layout models."""

    def old_model(**ctx):
        torch.manual_seed(0)
        ctx = {"aggregate": 1, "segments": 2, "segment_len": 3, "max_history": 30, **ctx}
        cfg = ModelConfig(n_layer=2, n_head=2, d_model=16, block_size=16, vocab_size=V)
        m = soft_model(cfg, context=ContextConfig(**ctx)).eval()
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        return m

    decodings = {
        "soft4_hard": decoding(mode="hard", temperature=0),
        "soft4_soft": decoding(mode="soft", temperature=0, collapse="lm_argmax"),
        "soft4_policy": decoding(mode="soft", temperature=0, collapse="lm_argmax",
                                 policy=CollapsePolicy("entropy", 1.0, 2)),
        "soft0_soft": decoding(mode="soft", temperature=0, collapse="nn_l2"),
        "soft3_sum": decoding(mode="soft", temperature=0, collapse="lm_argmax", policy=CollapsePolicy("entropy", 0.7)),
    }
    prompt = torch.tensor([[1, 22, 3, 34, 5, 16, 7], [37, 6, 25, 4, 13, 2, 1]])
    for name, case in json.loads((FIXTURES / "per_token_hierarchy.json").read_text()).items():
        m = old_model(**case["context"])
        d = decodings[name]
        d = replace(d, max_new_tokens=60)
        g = d.run(m, prompt)
        assert g.tokens.tolist() == case["ids"], name
        assert g.collapsed.int().tolist() == case["by_policy"], name


def test_stop_tokens_end_sequences_independently():
    m = model(**SEED_LIKE)
    d = decoding(mode="hard", temperature=1.0, max_new_tokens=30)
    free = d.run(m, prompts(), seed=7)
    stop = int(free.tokens[0, 4])  # a token sequence 0 emits at step 4
    d = replace(d, stop=(stop,))
    g = d.run(m, prompts(), seed=7)
    for i in range(len(prompts())):
        hits = (free.tokens[i] == stop).nonzero()
        n = int(hits[0]) + 1 if len(hits) else 30
        assert g.lengths[i] == n and bool(g.stopped[i]) == bool(len(hits))
        assert g.tokens[i, :n].tolist() == free.tokens[i, :n].tolist()  # the same text up to its own stop
        assert (g.tokens[i, n:] == -1).all() and (g.logprobs[i, n:] == 0).all()
        assert g.sequences()[i] == prompts()[i] + free.tokens[i, :n].tolist()
    assert g.lengths[0] == 5 and len(set(g.lengths.tolist())) > 1  # sequences ended at different steps


def test_a_sequence_does_not_depend_on_its_batch_or_its_order():
    m = model()
    d = DECODINGS["hard_sampled"]
    d = replace(d, max_new_tokens=12)
    ps = prompts()
    forward = d.run(m, ps, seed=[5, 6, 7, 8, 9])
    backward = d.run(m, ps[::-1], seed=[9, 8, 7, 6, 5])
    assert torch.equal(forward.tokens, backward.tokens.flip(0))


@pytest.mark.parametrize("ctx", [dict(soft=4), dict(soft=0)], ids=["soft", "no_soft"])
def test_every_phase_of_the_block_schedule_is_a_prefix_of_a_training_window(ctx):
    """With the ladder moving B tokens at a time, the window generation reads at every step is the start of the
    full window training builds from the same history (so a causal model trained on full windows has seen every
    phase of the schedule)."""
    lay = Layout.from_config(ContextConfig(aggregate=1, segments=2, segment_len=3, **ctx), 16)
    B_shift = 3
    g = torch.Generator().manual_seed(0)
    E = torch.randn(V, 6, generator=g)
    seq = torch.randint(V, (2, 80), generator=g)
    from softar.soft.window import summary_slots

    state = ContextState(lay, 2, V, 6, shift_every=B_shift)
    state.extend_hard(seq[:, :20])
    phases = set()
    for t in range(20, 80):
        state.push(E[seq[:, t]], seq[:, t], torch.ones(2, dtype=torch.bool), torch.zeros(2), E)
        summary, tokens, n_soft = state.window(E)
        n_tokens = tokens.shape[1]
        if lay.soft:
            assert state.hard.shape[1] == lay.hard  # the hard region stays full; the soft one takes the moves
        history = seq[:, : t + 1 - n_tokens]
        torch.testing.assert_close(summary, summary_slots(E, history, torch.full((2,), history.shape[1]), lay))
        assert torch.equal(tokens, E[seq[:, t + 1 - n_tokens : t + 1]])
        if t >= 20 + lay.soft:  # after the soft region first filled (generation starts it empty)
            phases.add(n_tokens)
    assert phases == set(range(lay.token_slots - B_shift + 1, lay.token_slots + 1))  # B phases, the last one full


def test_logits_hold_every_step_and_the_distribution_after_the_last_token():
    """return_logits: for each sequence, the distribution before each generated token and after its last one, which
    a full forward over the prompt and the tokens generated gives at those positions (no window slides here)."""
    m = model(block=64)
    d = decoding(mode="hard", temperature=1.0, max_new_tokens=12, stop_tokens=(7,))
    g = d.run(m, prompts()[:4], seed=4, return_logits=True)
    assert g.logits.shape == (4, 13, V)
    for i, p in enumerate(prompts()[:4]):
        n = int(g.lengths[i])
        ids = torch.tensor(p + g.tokens[i, :n].tolist())
        expected = m.lm.heads(m.lm.hidden(m.E[ids][None])).logits[0, len(p) - 1 :]  # [n + 1, V]
        torch.testing.assert_close(g.logits[i, : n + 1], expected, atol=1e-5, rtol=1e-5)
        assert (g.logits[i, n + 1 :] == 0).all()


def test_each_prompt_may_have_its_own_length_limit():
    from softar.decode import decode
    from softar.soft.collapse import Sampling
    from softar.soft.feeds import HardFeed

    m = model()
    limits = [3, 1, 7, 2, 5]
    g = decode(m, prompts(), HardFeed(Sampling(1.0)), limits, seed=1)
    assert g.lengths.tolist() == limits and g.tokens.shape == (5, 7)
    alone = decode(m, [prompts()[2]], HardFeed(Sampling(1.0)), 7, seed=3)
    assert g.tokens[2].tolist() == alone.tokens[0].tolist()  # the limit of another row changes nothing


def test_thoughts_filled_while_decoding_are_the_training_loops_and_the_answer_a_naive_loops():
    """A prompt's <thought> slots are filled as the prompt is read, by the loop training runs (`forward_thoughts`);
    the greedy answer after it is what a loop written here gets by recomputing the whole sequence at every step."""
    from softar.decode import decode
    from softar.soft.collapse import Sampling
    from softar.soft.feeds import HardFeed, SoftFeed
    from softar.soft.thoughts import forward_thoughts

    m = model(block=24)
    thought = 3
    m.thought_id = thought
    g = torch.Generator().manual_seed(0)
    ps = [torch.randint(4, V, (n,), generator=g).tolist() for n in (4, 4, 6)]
    ps = [p[:2] + [thought, thought, thought] + p[2:] for p in ps]  # three thought slots after two tokens
    out = decode(m, ps, HardFeed(Sampling(0.0)), 10, seed=0, thoughts=SoftFeed.thoughts(m))
    assert out.thoughts.shape == (3, 3, m.E.shape[1]) and (out.thought_tokens == -1).all()
    for i, p in enumerate(ps):
        _, trained = forward_thoughts(m, torch.tensor([p]))
        torch.testing.assert_close(out.thoughts[i], trained[0], atol=1e-5, rtol=1e-5)
        seq = m.E[torch.tensor(p)].clone()
        seq[2:5] = out.thoughts[i]
        answer = []
        for _ in range(10):  # naive: a full forward over everything at every step
            nxt = int(m.lm.heads(m.lm.hidden(seq[None])).logits[0, -1].argmax())
            answer.append(nxt)
            seq = torch.cat([seq, m.E[[nxt]]])
        assert out.tokens[i].tolist() == answer
