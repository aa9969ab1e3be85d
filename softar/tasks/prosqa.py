"""ProsQA (Coconut, Hao et al. 2024): is the person a A or a B, where the facts chain from the person to one option
and never reach the other. Records in Coconut's JSON format; a text rendering and a symbolic one (node ids)."""

from __future__ import annotations

import random

from softar import SoftarError
from softar.tasks.base import CONCEPTS, PEOPLE, Rendered
from softar.tasks.graphs import Graph, random_graph, relabel, shortest_chain


def fact(record: dict, a: int, b: int) -> str:
    sym, root = record["idx_to_symbol"], record["root"]
    return f"{sym[a]} is a {sym[b]}." if a == root else f"Every {sym[a]} is a {sym[b]}."


def make_record(rng: random.Random) -> dict:
    """One ProsQA-format record from a fresh random graph: facts in shuffled order, the options in random order."""
    g: Graph = relabel(random_graph(rng), rng)
    symbols = rng.sample(CONCEPTS, g.n - 1)
    idx_to_symbol = [rng.choice(PEOPLE) if i == g.root else symbols.pop() for i in range(g.n)]
    record = {"edges": [list(e) for e in g.edges], "root": g.root, "target": g.target, "neg_target": g.neg_target,
              "idx_to_symbol": idx_to_symbol}
    chain = shortest_chain(g.n, g.edges, g.root, g.target)
    options = [idx_to_symbol[g.target], idx_to_symbol[g.neg_target]]
    rng.shuffle(options)
    name = idx_to_symbol[g.root]
    facts = " ".join(fact(record, a, b) for a, b in g.edges)  # edges are already in random order
    return {"question": f"{facts} Is {name} a {options[0]} or {options[1]}?",
            "answer": f"{name} is a {idx_to_symbol[g.target]}.",
            "steps": [fact(record, a, b) for a, b in zip(chain, chain[1:], strict=False)], **record}


def options_in_order(record: dict) -> list[int]:
    """[first option, second option] as node ids, in the order the question's last sentence asks them."""
    words = record["question"].rsplit(" Is ", 1)[-1].replace("?", " ").split()
    ids = {s: i for i, s in enumerate(record["idx_to_symbol"])}
    options = (record["target"], record["neg_target"])
    asked = [ids[w] for w in words if ids.get(w) in options]
    if sorted(asked) != sorted(options):  # falling back to a fixed order would leak the answer
        raise SoftarError("its question does not end 'Is NAME a A or B?' with the target and the negative target")
    return asked


class ProsQA:
    name = "prosqa"
    renders = ("text", "symbolic")

    def render(self, record: dict, rendering: str) -> Rendered:
        if rendering == "text":
            return Rendered(record["question"], list(record["steps"]), record["answer"])
        edges, root = record["edges"], record["root"]
        a, b = options_in_order(record)
        chain = shortest_chain(len(record["idx_to_symbol"]), [tuple(e) for e in edges], root, record["target"]) or []
        return Rendered(" ".join(f"n{x} n{y} ;" for x, y in edges) + f" ? n{root} n{a} n{b}",
                        [f"n{x} n{y} ;" for x, y in zip(chain, chain[1:], strict=False)], f"n{record['target']}")

    def answer_node(self, record: dict, answer: list[str], rendering: str) -> int | None:
        """The answer's final concept: the node its last word naming a node of this graph names (None: none)."""
        names = self.node_tokens(record, rendering)
        nodes = [names.index(w) for w in answer if w in names]
        return nodes[-1] if nodes else None

    def options(self, record: dict) -> tuple[int, int]:
        """The two nodes the question offers: a model that names one at random is right half the time."""
        return record["target"], record["neg_target"]

    def check(self, record: dict, answer: list[str], rendering: str) -> bool:
        """Whether the answer's final concept is the target."""
        return self.answer_node(record, answer, rendering) == record["target"]

    def node_tokens(self, record: dict, rendering: str) -> list[str]:
        return list(record["idx_to_symbol"]) if rendering == "text" else [f"n{i}" for i in range(
            len(record["idx_to_symbol"]))]
