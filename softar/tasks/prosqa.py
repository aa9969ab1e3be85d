"""ProsQA (Coconut, Hao et al. 2024): is the person a A or a B, where the facts chain from the person to one option
and never reach the other. Records in Coconut's JSON format; a text rendering and a symbolic one (node ids)."""

from __future__ import annotations

import random
import re

from softar import SoftarError
from softar.tasks.base import CONCEPTS, PEOPLE, Rendered
from softar.tasks.graphs import Graph, check_graph, distances, relabel, shortest_chain, twin_graph


def fact(record: dict, a: int, b: int) -> str:
    sym = record["idx_to_symbol"]
    return f"{sym[a]} is a {sym[b]}." if sym[a] in PEOPLE else f"Every {sym[a]} is a {sym[b]}."


def make_record(rng: random.Random) -> dict:
    """One ProsQA-format record from a fresh twin graph (`twin_graph`): the root and its twin's root are two people,
    the other nodes concepts; facts in shuffled order, the options in random order."""
    g: Graph = relabel(twin_graph(rng), rng)
    people, symbols = rng.sample(PEOPLE, 2), rng.sample(CONCEPTS, g.n - 2)
    idx_to_symbol = [people[0] if i == g.root else people[1] if i == g.twin_root else symbols.pop()
                     for i in range(g.n)]
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
    """[first option, second option] as node ids, in the order the question's last sentence, "Is NAME a A or B?",
    asks them."""
    _, sep, last = record["question"].rpartition(" Is ")
    sym = record["idx_to_symbol"]
    words = last.removesuffix("?").split()
    if not (sep and last.endswith("?") and len(words) == 5 and words[:2] == [sym[record["root"]], "a"]
            and words[3] == "or" and sorted([words[2], words[4]]) == sorted(
                [sym[record["target"]], sym[record["neg_target"]]])):
        raise SoftarError("its question does not end 'Is NAME a A or B?' with the root, the target and the negative "
                          "target")
    return [sym.index(words[2]), sym.index(words[4])]


NAMES = set(PEOPLE + CONCEPTS)


def check_text(record: dict) -> None:
    """What the text rendering trains on must say what the graph says: the question's facts are the edges' facts,
    the steps a chain of them from the root to the target, the answer "ROOT is a TARGET."."""
    sym, root, target = record["idx_to_symbol"], record["root"], record["target"]
    facts = {fact(record, a, b): (a, b) for a, b in record["edges"]}
    said = {f.strip() for f in re.findall(r"[^.]+\.", record["question"].rpartition(" Is ")[0])}
    if said != set(facts):
        raise SoftarError("its question's facts are not the facts of its edges")
    at = root
    for step in record["steps"]:
        if facts.get(step, (None,))[0] != at:
            raise SoftarError(f"its steps are not a chain of its facts from the root ({step[:40]!r})")
        at = facts[step][1]
    if at != target:
        raise SoftarError("its steps do not end at the target")
    if record["answer"] != f"{sym[root]} is a {sym[target]}.":
        raise SoftarError(f"its answer is not '{sym[root]} is a {sym[target]}.'")


class ProsQA:
    name = "prosqa"
    renders = ("text", "symbolic")

    def validate(self, record: dict) -> None:
        """A DAG whose target the root reaches and whose negative target it does not, and a question that ends
        "Is NAME a A or B?" with the two options; every node named by a person or a concept of the vocabulary (a
        node named "is" or "." would be read out of every answer)."""
        if not set(record["idx_to_symbol"]) <= NAMES:
            bad = sorted(set(record["idx_to_symbol"]) - NAMES)[0]
            raise SoftarError(f"node name {bad!r} is not a person or concept of the task's vocabulary")
        check_graph(record, dag=True)
        if distances(len(record["idx_to_symbol"]), [tuple(e) for e in record["edges"]],
                     record["root"])[record["neg_target"]] is not None:
            raise SoftarError("the negative target is reachable from the root")
        options_in_order(record)
        check_text(record)

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

    def options_in_order(self, record: dict) -> list[int]:
        return options_in_order(record)

    def options(self, record: dict) -> tuple[int, int]:
        """The two nodes the question offers: a model that names one at random is right half the time."""
        return record["target"], record["neg_target"]

    def check(self, record: dict, answer: list[str], rendering: str) -> bool:
        """Whether the answer's final concept is the target."""
        return self.answer_node(record, answer, rendering) == record["target"]

    def node_tokens(self, record: dict, rendering: str) -> list[str]:
        return list(record["idx_to_symbol"]) if rendering == "text" else [f"n{i}" for i in range(
            len(record["idx_to_symbol"]))]
