"""Path finding on the same graphs: given the edges, a start and a goal, write a path from start to goal. The answer
is a sequence of nodes, so a reward can give partial credit (`reward`), not only right or wrong."""

from __future__ import annotations

from softar.tasks.base import Rendered
from softar.tasks.graphs import check_graph, distances, shortest_chain


class PathFind:
    name = "pathfind"
    renders = ("symbolic",)

    def validate(self, record: dict) -> None:
        """A graph (cycles allowed) whose goal the start reaches."""
        check_graph(record, dag=False)

    def render(self, record: dict, rendering: str) -> Rendered:
        edges, root, target = record["edges"], record["root"], record["target"]
        chain = shortest_chain(len(record["idx_to_symbol"]), [tuple(e) for e in edges], root, target) or []
        return Rendered(" ".join(f"n{x} n{y} ;" for x, y in edges) + f" ? n{root} n{target}",
                        [f"n{x} n{y} ;" for x, y in zip(chain, chain[1:], strict=False)],
                        " ".join(f"n{x}" for x in chain))

    def reward(self, record: dict, answer: list[str]) -> float:
        """1.0 for a right answer (`check`); else the progress toward the goal that the answer's valid prefix makes
        from the start (the drop in shortest distance to the goal, over the start's), capped below 1: wandering
        along valid edges earns nothing."""
        if self.check(record, answer):
            return 1.0
        n, edges = len(record["idx_to_symbol"]), [tuple(e) for e in record["edges"]]
        to_goal = distances(n, [(b, a) for a, b in edges], record["target"])  # distance to the goal, per node
        nodes = [int(w[1:]) if w[:1] == "n" and w[1:].isdigit() and int(w[1:]) < n else -1 for w in answer]
        start = to_goal[record["root"]]
        if not nodes or nodes[0] != record["root"] or not start:
            return 0.0
        at, known = nodes[0], set(edges)
        for b in nodes[1:]:
            if (at, b) not in known:
                break
            at = b
        left = to_goal[at]
        return 0.0 if left is None else max(0, min(start - left, start - 1)) / start

    def check(self, record: dict, answer: list[str], rendering: str = "symbolic") -> bool:
        """Any valid path from the start to the goal along given edges."""
        n, edges = len(record["idx_to_symbol"]), {tuple(e) for e in record["edges"]}
        if not answer or not all(w[:1] == "n" and w[1:].isdigit() and int(w[1:]) < n for w in answer):
            return False
        nodes = [int(w[1:]) for w in answer]
        return nodes[0] == record["root"] and nodes[-1] == record["target"] and all(
            (a, b) in edges for a, b in zip(nodes, nodes[1:], strict=False))

    def node_tokens(self, record: dict, rendering: str = "symbolic") -> list[str]:
        return [f"n{i}" for i in range(len(record["idx_to_symbol"]))]
