"""Rollouts over thoughts and their replay: the replay's log-probabilities against a plain full forward, the
importance ratio exactly 1 on the first inner step, and a toy bandit that GRPO solves under every policy."""

import pytest
import torch

from softar.config import ModelConfig, SoftConfig
from softar.rl.objective import clipped_objective, group_advantages
from softar.rl.rollout import POLICIES, Policy, replay, rollout

from .conftest import soft_model

EOS, Q, BOT, THOUGHT, EOT = range(5)  # a toy vocabulary; 5..7 are answers
PROMPT = [Q, BOT, THOUGHT, THOUGHT, EOT]


def toy_model(kind: str = "hidden", seed: int = 0):
    torch.manual_seed(seed)
    model = soft_model(ModelConfig(n_layer=1, n_head=2, d_model=16, block_size=16, vocab_size=8),
                       soft=SoftConfig(kind=kind)).eval()
    model.thought_id = THOUGHT
    return model


@pytest.mark.parametrize("kind", POLICIES)
def test_the_first_inner_step_has_a_ratio_of_exactly_one(kind):
    model, policy = toy_model(), Policy(kind, max_answer=4)
    actions = rollout(model, PROMPT, 6, policy, EOS, torch.Generator().manual_seed(1))
    with torch.no_grad():
        old, mask = replay(model, PROMPT, actions, policy, EOS)
    new, mask2 = replay(model, PROMPT, actions, policy, EOS)
    assert torch.equal(mask, mask2) and torch.equal(new.detach(), old) and new.requires_grad
    assert torch.equal(torch.exp(new - old)[mask], torch.ones(int(mask.sum())))
    n_thought = 2 if kind != "soft" else 0
    assert int(mask[:, :2].sum()) == 6 * n_thought and mask[:, 2].all()  # the first answer token always counts


def test_replayed_log_probs_equal_a_plain_forward_over_the_drawn_sequence():
    """hard policy: the thoughts are E[y]; the replay through the cache gives the log-probs a full forward over
    [question, E[y1], E[y2], <eot>, answer] gives."""
    model, policy = toy_model(), Policy("hard", max_answer=4, temperature=0.7)
    actions = rollout(model, PROMPT, 5, policy, EOS, torch.Generator().manual_seed(2))
    logp, mask = replay(model, PROMPT, actions, policy, EOS)
    E = model.E
    for g in range(5):
        answer = [a for a in actions.answers[g].tolist() if a >= 0]
        y = actions.thought_ids[g].tolist()
        seq = torch.cat([E[[Q, BOT]], E[y], E[[EOT]], E[answer[:-1]]])[None]
        ref = (model.read(seq).logits[0].float() / 0.7).log_softmax(-1)  # position t predicts slot t + 1
        targets = [(1, y[0]), (2, y[1])] + [(4 + i, a) for i, a in enumerate(answer)]  # <eot> predicts answer[0]
        expected = torch.stack([ref[pos, tok] for pos, tok in targets])
        torch.testing.assert_close(logp[g][mask[g]], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", POLICIES)
def test_grpo_solves_a_toy_bandit_under_every_policy(kind):
    """Reward 1 for answering token 6 first, else 0: a few dozen GRPO steps take the policy from chance (1/8) to
    answering it nearly always."""
    model, policy = toy_model(), Policy(kind, max_answer=2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(3)
    rewards = []
    for _ in range(40):
        actions = rollout(model, PROMPT, 16, policy, EOS, gen)
        reward = (actions.answers[:, 0] == 6).float()
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
    assert rewards[0] < 0.5 and sum(rewards[-5:]) / 5 > 0.9, rewards
