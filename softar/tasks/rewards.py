"""What a rollout earns for what it wrote: its steps (the tokens before its last <ans>) and its answer (after it).
`rl.reward` names one of `REWARDS`; each maps (task, record, steps, answer, rendering) to a reward in [0, 1], and
a rollout *passes* (pass@k) only where the reward is exactly 1.

- **answer**: the task's own reward where it has one (path finding's partial progress), else 1 for a right answer.
- **path**: 1 when the written steps are the record's chain and the answer is right, else 0: on a task with two
  options a right answer alone is a coin flip; a right path of D nodes is not.
- **path_partial**: the path's reward, and otherwise partial credit for the valid part of the written path: the
  number of its first nodes that follow the graph's edges from the person (at most the chain's length), over the
  chain's length, times 0.9 (only the exact path earns 1).
- **format**: 1 for a well-formed output (every step a node of this graph, then exactly one node as the answer),
  right or wrong: the format-only null a learned format must not be mistaken for.

The path rewards read each step as one node token (a task with `node_steps`: twins), and path and path_partial
the whole chain written in order (a cot run); `softar rl` refuses them otherwise.
"""

from __future__ import annotations

from collections.abc import Callable

PARTIAL = 0.9  # the most a path that is not exactly right can earn

Reward = Callable[..., float]


def answer_reward(task, record: dict, steps: list[str], answer: list[str], rendering: str) -> float:
    if hasattr(task, "reward"):
        return float(task.reward(record, answer))
    return float(task.check(record, answer, rendering))


def path_reward(task, record: dict, steps: list[str], answer: list[str], rendering: str) -> float:
    chain = [w for s in task.render(record, rendering).steps for w in s.split()]
    return float(steps == chain and task.check(record, answer, rendering))


def valid_prefix(task, record: dict, steps: list[str], rendering: str) -> int:
    """How many of the written steps, from the first, are nodes that follow the graph's edges from the person."""
    names, edges = task.node_tokens(record, rendering), {tuple(e) for e in record["edges"]}
    at, n = record["root"], 0
    for w in steps:
        if w not in names or (at, names.index(w)) not in edges:
            break
        at, n = names.index(w), n + 1
    return n


def path_partial_reward(task, record: dict, steps: list[str], answer: list[str], rendering: str) -> float:
    if path_reward(task, record, steps, answer, rendering):
        return 1.0
    chain = task.render(record, rendering).steps
    return PARTIAL * min(valid_prefix(task, record, steps, rendering), len(chain)) / max(len(chain), 1)


def format_reward(task, record: dict, steps: list[str], answer: list[str], rendering: str) -> float:
    names = set(task.node_tokens(record, rendering))
    return float(len(answer) == 1 and answer[0] in names and all(w in names for w in steps))


REWARDS: dict[str, Reward] = {"answer": answer_reward, "path": path_reward, "path_partial": path_partial_reward,
                              "format": format_reward}
PATH_REWARDS = ("path", "path_partial", "format")  # read each step as one node token: tasks with `node_steps`
