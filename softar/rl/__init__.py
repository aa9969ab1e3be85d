"""Reinforcement learning over thoughts (GRPO). `objective` holds the algorithm's pure pieces, each tested against a
slow reference or a closed form; `rollout` samples a group of continuations of a task prompt under a policy over
thoughts (hard, soft, noisy-soft, gated) and replays them with gradients. The trainer and a `softar rl` command are
not built yet."""
