"""Reinforcement learning over thoughts (GRPO): `objective` holds the algorithm's pure pieces, `rollout` samples
and replays groups of rollouts under a policy over thoughts (hard, soft, noisy-soft, gated), and `trainer` is
`softar rl`, the Trainer with a GRPO step."""
