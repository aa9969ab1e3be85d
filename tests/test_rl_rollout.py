"""Rollouts over thoughts and their replay: every policy's replayed log-probabilities against a plain full forward over
the drawn sequence, thoughts replayed as they were drawn, the importance ratio exactly 1 on the first inner step, and
toy bandits that GRPO solves under every policy, through the answer and through the thoughts themselves."""

import math

import pytest
import torch

from softar.config import ModelConfig, SoftConfig
from softar.rl.objective import clipped_objective, group_advantages
from softar.rl.rollout import Policy, replay, rollout
from softar.soft.feeds import thought_policies
from softar.soft.gate import GATE, ThoughtGate, load_initial
from softar.soft.tokens import make_soft_token

from .conftest import soft_model

EOS, Q, BOT, THOUGHT, EOT = range(5)  # a toy vocabulary; 5..7 are answers
PROMPT = [Q, BOT, THOUGHT, THOUGHT, EOT]
POLICIES = thought_policies()


def seeds(n: int, base: int = 0) -> list[int]:
    return list(range(base, base + n))


def toy_model(kind: str = "hidden", seed: int = 0):
    """A 1-layer model on the toy vocabulary, with the gated policy's learned gate (the other policies ignore it)."""
    torch.manual_seed(seed)
    model = soft_model(ModelConfig(n_layer=1, n_head=2, d_model=16, block_size=16, vocab_size=8),
                       soft=SoftConfig(kind=kind)).eval()
    model.thought_id = THOUGHT
    model.add_module(GATE, ThoughtGate(16))
    return model


@pytest.mark.parametrize("kind", POLICIES)
@pytest.mark.parametrize("soft_kind", ["hidden", "expected"])
def test_a_replay_is_the_same_with_and_without_gradients_and_the_first_ratio_is_exactly_one(kind, soft_kind):
    model, policy = toy_model(soft_kind), Policy(kind, max_answer=4, temperature=0.8)
    actions = rollout(model, [PROMPT], 6, policy, EOS, seeds(6, 1))
    with torch.no_grad():
        old, mask = replay(model, PROMPT, actions, policy, EOS)
    new, mask2 = replay(model, PROMPT, actions, policy, EOS)
    assert torch.equal(mask, mask2) and torch.equal(new.detach(), old) and new.requires_grad
    assert int(mask[:, :2].sum()) == (0 if kind == "soft" else 12) and mask[:, 2].all()


def reference_log_probs(model, policy, actions, g):
    """Row g's actions scored by one plain forward (no cache) over [question, thoughts as drawn, <eot>, answer]."""
    E, T = model.E, policy.temperature
    answer = [a for a in actions.answers[g].tolist() if a >= 0]
    seq = torch.cat([E[[Q, BOT]], actions.thought_vectors[g], E[[EOT]], E[answer[:-1]]])[None]
    out = model.read(seq)
    logp = (out.logits[0].float() / T).log_softmax(-1)  # position t predicts slot t + 1
    thoughts = []
    for t in range(2):  # thought t is drawn from the outputs at position t + 1
        at = out.at((0, slice(t + 1, t + 2)))
        mu = make_soft_token(at, E, model.soft_spec)[0]
        if policy.kind in ("hard", "gated"):
            y = actions.thought_ids[g, t]
            thoughts.append(logp[t + 1, y])
            vector = E[y] if policy.kind == "hard" else \
                getattr(model, GATE)(at.h_m[0], E[y], mu, E.pow(2).mean().sqrt())  # HRPO's formula, `ThoughtGate`
        elif policy.kind == "noisy_soft":
            vector = actions.thought_vectors[g, t]
            s = float(actions.noise_std[g, t])  # log N(x; mu, s^2 I), written out
            thoughts.append(-(vector - mu).pow(2).sum() / (2 * s * s) - len(mu) * math.log(s * math.sqrt(2 * math.pi)))
        else:
            vector = mu
        torch.testing.assert_close(vector, actions.thought_vectors[g, t], atol=1e-5, rtol=1e-5)
    answers = [logp[4 + i, a] for i, a in enumerate(answer)]  # <eot>, at position 4, predicts answer[0]
    return torch.stack(thoughts + answers)


@pytest.mark.parametrize("kind", POLICIES)
def test_replayed_log_probs_equal_a_plain_forward_over_the_drawn_sequence(kind):
    model, policy = toy_model(), Policy(kind, max_answer=4, temperature=0.7)
    actions = rollout(model, [PROMPT], 5, policy, EOS, seeds(5, 2))
    logp, mask = replay(model, PROMPT, actions, policy, EOS)
    assert len({len([a for a in row if a >= 0]) for row in actions.answers.tolist()}) > 1  # rows end apart
    for g in range(5):
        torch.testing.assert_close(logp[g][mask[g]], reference_log_probs(model, policy, actions, g), atol=1e-4,
                                   rtol=1e-4)


def test_policies_refuse_what_they_cannot_replay():
    with pytest.raises(ValueError, match="draws a token"):
        rollout(toy_model("gated"), [PROMPT], 2, Policy("noisy_soft"), EOS, seeds(2))
    with pytest.raises(ValueError, match="model.eval"):
        rollout(toy_model().train(), [PROMPT], 2, Policy("hard"), EOS, seeds(2))
    long = [Q] * 10 + PROMPT[1:]  # 14 of the 16 slots: room for 2 answer tokens, whatever max_answer says
    with pytest.raises(ValueError, match="leaves no room"):
        rollout(toy_model(), [[Q] * 12 + PROMPT[1:]], 2, Policy("hard"), EOS, seeds(2))
    assert rollout(toy_model(), [long], 2, Policy("hard", max_answer=12), EOS, seeds(2)).answers.shape == (2, 2)
    with pytest.raises(ValueError, match="one run"):
        rollout(toy_model(), [[Q, THOUGHT, BOT, THOUGHT, EOT]], 2, Policy("hard", max_answer=2), EOS, seeds(2))
    with pytest.raises(ValueError, match="positive"):
        Policy("hard", temperature=0)
    plain = toy_model()
    delattr(plain, GATE)
    with pytest.raises(ValueError, match="no learned gate"):
        rollout(plain, [PROMPT], 2, Policy("gated"), EOS, seeds(2))


def test_the_gate_starts_near_the_sampled_token_and_learns_from_later_tokens():
    """At its start a = 0.95 and i = 1/2 everywhere: x = 0.95 E[y] + sqrt(1 - 0.95^2) / 2 * s, with s the soft token
    rescaled to the embeddings' RMS coordinate. The answer's log-probabilities depend on x, so they reach the gate."""
    model = toy_model("expected")
    E, gate = model.E, getattr(model, GATE)
    h, y = torch.randn(3, 16), torch.tensor([1, 5, 7])
    soft = torch.randn(3, 16) * 10
    rms = E.pow(2).mean().sqrt()
    expected = 0.95 * E[y] + (1 - 0.95**2) ** 0.5 / 2 * soft * rms / soft.pow(2).mean(-1, keepdim=True).sqrt()
    torch.testing.assert_close(gate(h, E[y], soft, rms), expected)
    policy = Policy("gated", max_answer=3)
    actions = rollout(model, [PROMPT], 4, policy, EOS, seeds(4))
    logp, mask = replay(model, PROMPT, actions, policy, EOS)
    logp[:, 2:][mask[:, 2:]].sum().backward()  # the answer tokens only
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gate.parameters())


def test_an_rl_model_takes_a_supervised_runs_weights_and_keeps_its_fresh_gate():
    supervised, rl = toy_model(seed=1), toy_model(seed=2)
    state = {k: v for k, v in supervised.state_dict().items() if not k.startswith(GATE)}
    fresh = {k: v.clone() for k, v in rl.state_dict().items() if k.startswith(GATE)}
    load_initial(rl, state)
    for k, v in rl.state_dict().items():
        assert torch.equal(v, fresh[k] if k.startswith(GATE) else state[k])
    with pytest.raises(RuntimeError, match="Missing key"):
        load_initial(rl, {k: v for k, v in state.items() if k != "lm.backbone.ln_f.weight"})


def grpo(model, policy, reward_of, steps, lr=1e-2, seed=3):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    rewards = []
    for step in range(steps):
        actions = rollout(model, [PROMPT], 16, policy, EOS, seeds(16, 1000 * seed + 16 * step))
        reward = reward_of(actions)
        rewards.append(reward.mean().item())
        advantages = group_advantages(reward[None])[0]
        if not advantages.any():  # a group that agrees carries no signal; Adam's momentum would still move
            continue
        with torch.no_grad():
            old, _ = replay(model, PROMPT, actions, policy, EOS)
        logp, mask = replay(model, PROMPT, actions, policy, EOS)
        loss, _ = clipped_objective(logp, old, advantages, mask, 0.2)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return rewards


@pytest.mark.parametrize("kind", POLICIES)
def test_grpo_solves_a_toy_bandit_under_every_policy(kind):
    """Reward 1 for answering token 6 first, else 0: a few dozen GRPO steps take the policy from chance (1/8) to
    answering it nearly always."""
    rewards = grpo(toy_model(), Policy(kind, max_answer=2), lambda a: (a.answers[:, 0] == 6).float(), 40)
    assert rewards[0] < 0.5 and sum(rewards[-5:]) / 5 > 0.9, rewards


def test_grpo_learns_through_the_thoughts_themselves():
    """The reward reads only the thoughts: hard thoughts learn to be token 6; noisy soft thoughts move their mean
    toward a target vector (their log-density carries the whole gradient)."""
    hard = grpo(toy_model(), Policy("hard", max_answer=1), lambda a: (a.thought_ids[:, 0] == 6).float(), 40)
    assert hard[0] < 0.5 and sum(hard[-5:]) / 5 > 0.9, hard
    model = toy_model("expected")
    target = model.E[6].detach() * 3
    def closeness(a):
        return -(a.thought_vectors[:, 0] - target).norm(dim=-1)
    soft = grpo(model, Policy("noisy_soft", max_answer=1, sigma=0.3), closeness, 60, lr=3e-2)
    assert sum(soft[-5:]) / 5 > soft[0] + 0.5 * abs(soft[0]), soft
    null = grpo(toy_model("expected"), Policy("soft", max_answer=1), closeness, 10, lr=3e-2)
    assert len(set(null)) == 1  # deterministic thoughts: a thought-only reward is the same for the whole group


@pytest.mark.parametrize("kind", POLICIES)
def test_a_batch_of_prompts_rolls_out_as_each_prompt_alone(kind):
    """All prompts x group members go as one batch; each rollout draws from its own stream, so a prompt's group is
    what it gets rolled out alone with the same seeds (noisy_soft's noise scale is its own group's)."""
    model, policy = toy_model("expected"), Policy(kind, max_answer=4)
    prompts = [PROMPT, [Q] * 8 + [BOT, THOUGHT, THOUGHT, EOT], PROMPT]  # 12 slots: room for 4 answer tokens
    batch = rollout(model, prompts, 3, Policy(kind, max_answer=10), EOS, seeds(9, 40))
    for k, p in enumerate(prompts):
        alone = rollout(model, [p], 3, Policy(kind, max_answer=10), EOS, seeds(3, 40 + 3 * k))
        mine = batch.rows(3 * k, 3 * k + 3)
        assert torch.equal(mine.thought_ids, alone.thought_ids)
        torch.testing.assert_close(mine.thought_vectors, alone.thought_vectors, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mine.noise_std, alone.noise_std, atol=1e-6, rtol=1e-5)
        A = alone.answers.shape[1]
        assert torch.equal(mine.answers[:, :A], alone.answers) and (mine.answers[:, A:] == -1).all()
        with torch.no_grad():  # a group of the padded batch replays as the group rolled out alone
            torch.testing.assert_close(replay(model, p, mine, policy, EOS), replay(model, p, alone, policy, EOS))
