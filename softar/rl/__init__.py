"""Reinforcement learning over thoughts (GRPO). `objective` holds the algorithm's pure pieces, each tested against a
slow reference or a closed form; the rollouts over hard, soft and noisy-soft thoughts and a `softar rl` command are
not built yet."""
