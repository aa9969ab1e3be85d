"""The associative-recall warm-up: the lookup every graph question is made of, learned first, where supervision is
dense (the role pretraining plays for a pretrained model; multi-query associative recall in the node-token format).

A sequence holds `pairs` facts "nK nV ;" over pairs + 2 nodes (distinct keys; each value another of those nodes, as
in a graph's facts), then <bot> <eot>, then every key asked again in a fresh order, "nK nV ;": the loss is on each V,
predicted at its K. Fresh facts every batch, from the batch's own generator, so nothing is memorised and a resumed
run draws the same batches. (Values drawn from all 64 node tokens instead were not learned in 600 steps by a 2-layer
model that learns these in 150.)"""

from __future__ import annotations

import random

import torch

from softar.tasks.base import MAX_NODES

EVAL_SEED, EVAL_SEQUENCES = "recall-eval", 256
# Recall accuracy at the warm-up's end below which it did not take: where it took it ended at 0.98-1.00, where it did
# not at 0.19-0.35 (docs/reasoning.md, amendment 6 and its pilots), and the task then started without the lookup.
WARM_UP_TOOK = 0.95


def recall_batch(rng: random.Random, stoi: dict[str, int], n: int, pairs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n recall sequences -> inputs and targets [n, 6 * pairs + 2] (targets -1 except at each queried key)."""
    L = 6 * pairs + 2
    x, y = torch.empty(n, L, dtype=torch.long), torch.full((n, L), -1, dtype=torch.long)
    node, sep = [stoi[f"n{i}"] for i in range(MAX_NODES)], stoi[";"]
    for row in range(n):
        nodes = rng.sample(range(MAX_NODES), pairs + 2)
        keys = rng.sample(nodes, pairs)
        value = {k: rng.choice([v for v in nodes if v != k]) for k in keys}
        asked = rng.sample(keys, pairs)
        seq = [t for k in keys for t in (node[k], node[value[k]], sep)] + [stoi["<bot>"], stoi["<eot>"]]
        queries = len(seq)
        seq += [t for k in asked for t in (node[k], node[value[k]], sep)]
        x[row] = torch.tensor(seq)
        y[row, queries : L : 3] = x[row, queries + 1 : L : 3]  # at each asked key, its value
    return x, y


@torch.no_grad()
def recall_accuracy(model, stoi: dict[str, int], pairs: int, device) -> float:
    """Greedy accuracy on the asked values of a fixed set of recall sequences (the same for every run)."""
    x, y = recall_batch(random.Random(EVAL_SEED), stoi, EVAL_SEQUENCES, pairs)
    was_training = model.training
    model.eval()
    try:
        logits = model(x.to(device))
    finally:
        model.train(was_training)
    asked = y >= 0
    return (logits.argmax(-1).cpu()[asked] == y[asked]).float().mean().item()
