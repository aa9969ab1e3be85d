"""A leak audit for two-option graph questions: how often a rule that looks only at local statistics of the two
options, without any search from the root, names the reachable one. A task that can be answered this way does not
test reasoning; every rule here should sit near 0.5.

Each rule scores both options with one statistic and picks the higher (a tie counts one half); its accuracy is reported
in its better direction (higher or lower), max(acc, 1 - acc), since a leak in either direction is a leak."""

from __future__ import annotations

from collections.abc import Callable

Stat = Callable[[dict, int], float]


def _graph(record: dict) -> tuple[list[list[int]], list[list[int]]]:
    """(parents, children) of every node."""
    n = len(record["idx_to_symbol"])
    parents: list[list[int]] = [[] for _ in range(n)]
    kids: list[list[int]] = [[] for _ in range(n)]
    for a, b in record["edges"]:
        kids[a].append(b)
        parents[b].append(a)
    return parents, kids


def _first_mention(record: dict, v: int) -> float:
    """The index of the first fact (edge, in the question's order) that mentions v."""
    return float(next((i for i, (a, b) in enumerate(record["edges"]) if v in (a, b)), len(record["edges"])))


def _stats() -> dict[str, Stat]:
    def via(f: Callable[[list[list[int]], list[list[int]], int], float]) -> Stat:
        return lambda r, v: f(*_graph(r), v)

    return {
        "in_degree": via(lambda p, k, v: len(p[v])),
        "out_degree": via(lambda p, k, v: len(k[v])),
        "facts_mentioning": via(lambda p, k, v: len(p[v]) + len(k[v])),
        "parents_in_degree_sum": via(lambda p, k, v: sum(len(p[u]) for u in p[v])),
        "parents_out_degree_sum": via(lambda p, k, v: sum(len(k[u]) for u in p[v])),
        "children_in_degree_sum": via(lambda p, k, v: sum(len(p[u]) for u in k[v])),
        "children_out_degree_sum": via(lambda p, k, v: sum(len(k[u]) for u in k[v])),
        "distinct_grandparents": via(lambda p, k, v: len({g for u in p[v] for g in p[u]})),
        "distinct_grandchildren": via(lambda p, k, v: len({g for u in k[v] for g in k[u]})),
        "first_mention": _first_mention,
    }


RULES: dict[str, Stat] = _stats()


def rule_accuracy(records: list[dict], stat: Stat) -> float:
    """How often picking the option with the higher statistic names the target (ties: one half)."""
    score = 0.0
    for r in records:
        t, u = stat(r, r["target"]), stat(r, r["neg_target"])
        score += 1.0 if t > u else 0.5 if t == u else 0.0
    return score / len(records)


def audit(splits: dict[str, list[dict]], task) -> dict:
    """Per split: each rule's accuracy in its better direction, and the largest of them; `task` reads which option
    a question asks first (`options_in_order`), the last rule."""
    rules_of = RULES | {"asked_first": lambda r, v: float(task.options_in_order(r)[0] == v)}
    out = {}
    for split, records in splits.items():
        rules = {name: round(max(a, 1 - a), 4) for name, a in
                 ((name, rule_accuracy(records, stat)) for name, stat in rules_of.items())}
        worst = max(rules, key=rules.get)
        out[split] = {"rules": rules, "max": rules[worst], "max_rule": worst, "questions": len(records)}
    return out
