"""Twins: a depth-controlled ProsQA question built to be learned on a CPU. Two isomorphic components hang from two
people; in each, every node has at most one child, so the person's chain of D edges ends at its sink. "Which of these
two sinks does the person reach in D hops?" needs exactly D lookups (each node's only child), and the isomorphism
leaves no local statistic that tells the options apart (`softar task audit`).

Symbolic rendering, records in ProsQA's JSON format:
    question  "n3 n9 ; n9 n0 ; ... ? ; ; nA nB nR"   the facts (parent child ;), then "?", one ";" per hop (the
                                                      question states D), the two options and the person
    steps     ["n9", "n0"]                             the chain from the person: each step one lookup
    answer    "n0"                                     the target (the chain's last node)
Training draws fresh graphs every batch (`generate`), so there is no train set to memorise; valid and test hold
fixed questions per depth."""

from __future__ import annotations

import random

from softar import SoftarError
from softar.tasks.base import MAX_NODES, Rendered
from softar.tasks.graphs import check_graph, children, distances, relabel, shortest_chain, twin_chains

NODES, DEPTHS = 8, (1, 2, 3, 4)  # nodes per twin (16 per graph), the depths a dataset asks
COUNTS = {"valid": 100, "test": 1000}  # questions per depth


def question_text(edges: list, options: list[int], root: int, depth: int) -> str:
    return " ".join(f"n{a} n{b} ;" for a, b in edges) + " ?" + " ;" * depth + f" n{options[0]} n{options[1]} n{root}"


def make_record(rng: random.Random, nodes: int, depth: int) -> dict:
    """One twins question at `depth`: a fresh `twin_chains` graph under random node ids and edge order, the options
    in random order."""
    g = relabel(twin_chains(rng, nodes, depth), rng)
    options = [g.target, g.neg_target]
    rng.shuffle(options)
    chain = shortest_chain(g.n, g.edges, g.root, g.target) or []
    return {"question": question_text(g.edges, options, g.root, depth), "answer": f"n{g.target}",
            "steps": [f"n{v}" for v in chain[1:]], "edges": [list(e) for e in g.edges], "root": g.root,
            "target": g.target, "neg_target": g.neg_target, "idx_to_symbol": [f"n{i}" for i in range(g.n)]}


class Twins:
    name = "twins"
    renders = ("symbolic",)
    online = True  # training questions are generated fresh every batch: no train.json
    node_steps = True  # each step one node token, the answer one node: what the path rewards of `softar rl` read
    counts = COUNTS  # the fixed splits' questions per depth

    @staticmethod
    def generator(nodes: int | None = None, max_depth: int | None = None) -> dict:
        """The generator's parameters (task.json's "generator"), defaults filled: depths 1..max_depth, at most 4
        and below `nodes`."""
        nodes = nodes or NODES
        return {"nodes": nodes, "depths": list(range(1, (max_depth or min(max(DEPTHS), nodes - 1)) + 1))}

    @staticmethod
    def check_generator(params: object) -> None:
        """Generator parameters a dataset may hold: two twins within the node-token vocabulary, depths below
        nodes; anything else is a one-line error."""
        if not isinstance(params, dict) or set(params) != {"nodes", "depths"}:
            raise SoftarError("twins: the generator must map nodes and depths (the training questions' parameters)")
        nodes, depths = params["nodes"], params["depths"]
        if not (type(nodes) is int and 2 <= nodes <= MAX_NODES // 2):
            raise SoftarError(f"twins: nodes per twin must be 2 to {MAX_NODES // 2}, got {nodes!r}")
        if not (isinstance(depths, list) and depths and all(type(d) is int and 1 <= d < nodes for d in depths)
                and len(set(depths)) == len(depths)):
            raise SoftarError(f"twins: depths must be distinct integers in [1, {nodes - 1}], got {depths!r}")

    def generate(self, rng: random.Random, params: dict, n: int, one_depth: bool) -> list[dict]:
        """A training batch from a dataset's generator parameters (task.json's "generator"): n fresh questions, each
        at a depth drawn uniformly from its depths, or with `one_depth` all at one such depth (one question length,
        which continuous thoughts need for their slots to line up)."""
        depths = [rng.choice(params["depths"])] * n if one_depth else [rng.choice(params["depths"]) for _ in range(n)]
        return [make_record(rng, params["nodes"], d) for d in depths]

    def splits(self, rng: random.Random, counts: dict[str, int], params: dict) -> dict[str, list[dict]]:
        """The fixed splits: counts[split] questions at each depth, the depths taking turns (so the first n
        questions, which periodic evaluations read, cover every depth alike)."""
        return {split: [make_record(rng, params["nodes"], d) for _ in range(k) for d in params["depths"]]
                for split, k in counts.items()}

    def options_in_order(self, record: dict) -> list[int]:
        """[first option, second option] as node ids, as the question asks them."""
        _, sep, last = record["question"].rpartition(" ? ")
        words = last.split()
        if not sep or len(words) < 4 or set(words[:-3]) != {";"} or not all(
                w[:1] == "n" and w[1:].isdigit() for w in words[-3:]):
            raise SoftarError("its question does not end '? ; nA nB nR' (one ';' per hop)")
        return [int(words[-3][1:]), int(words[-2][1:])]

    def validate(self, record: dict) -> None:
        """Node names n0..n{n-1}; a DAG in which every node has at most one child; the person reaches the target
        and not the negative target; and the question, steps and answer are the ones this graph makes."""
        n, edges, root = len(record["idx_to_symbol"]), [tuple(e) for e in record["edges"]], record["root"]
        if record["idx_to_symbol"] != [f"n{i}" for i in range(n)]:
            raise SoftarError("idx_to_symbol must be n0, n1, ... (the symbolic node names)")
        check_graph(record, dag=True)
        if any(len(kids) > 1 for kids in children(n, edges)):
            raise SoftarError("a node has more than one child; twins chains have at most one")
        dist = distances(n, edges, root)
        if dist[record["neg_target"]] is not None:
            raise SoftarError("the negative target is reachable from the root")
        options = self.options_in_order(record)
        if sorted(options) != sorted([record["target"], record["neg_target"]]):
            raise SoftarError("its options are not the target and the negative target")
        depth = dist[record["target"]]
        self.check_twins(record, edges, depth)
        chain = shortest_chain(n, edges, root, record["target"]) or []
        if record["question"] != question_text(record["edges"], options, root, depth):
            raise SoftarError("its question is not its edges' facts, then '?', one ';' per hop and 'nA nB nR'")
        if record["steps"] != [f"n{v}" for v in chain[1:]] or record["answer"] != f"n{record['target']}":
            raise SoftarError("its steps are not the chain from the root to the target, or its answer is not "
                              "the target")

    @staticmethod
    def check_twins(record: dict, edges: list[tuple[int, int]], depth: int) -> None:
        """The structure that keeps a question leak-free: two components, one per option, with the same size and
        the same multiset of (in-degree, out-degree); both options sinks; another source reaching the negative
        target in exactly `depth` hops (the twin's person). Cheap necessary conditions of the isomorphism the
        generator builds, so a foreign file cannot pose a question that local statistics answer."""
        n = len(record["idx_to_symbol"])
        parent = list(range(n))

        def find(v: int) -> int:
            while parent[v] != v:
                parent[v] = parent[parent[v]]
                v = parent[v]
            return v

        for a, b in edges:
            parent[find(a)] = find(b)
        kids = children(n, edges)
        indeg = [0] * n
        for _, b in edges:
            indeg[b] += 1
        t, u = record["target"], record["neg_target"]
        comps = {find(v) for v in range(n)}

        def profile(c: int) -> list[tuple[int, int]]:
            return sorted((indeg[v], len(kids[v])) for v in range(n) if find(v) == c)

        if len(comps) != 2 or find(t) == find(u) or find(record["root"]) != find(t) or kids[t] or kids[u] \
                or profile(find(t)) != profile(find(u)):
            raise SoftarError("its graph is not two twin components (one per option, the same degrees, both "
                              "options sinks)")
        if not any(indeg[v] == 0 and find(v) == find(u) and distances(n, edges, v)[u] == depth for v in range(n)):
            raise SoftarError("no person in the negative target's component reaches it in as many hops")

    def render(self, record: dict, rendering: str) -> Rendered:
        return Rendered(record["question"], list(record["steps"]), record["answer"])

    def answer_node(self, record: dict, answer: list[str], rendering: str) -> int | None:
        """The node the answer's last node token names (None: none of this graph's)."""
        names = self.node_tokens(record, rendering)
        nodes = [names.index(w) for w in answer if w in names]
        return nodes[-1] if nodes else None

    def options(self, record: dict) -> tuple[int, int]:
        return record["target"], record["neg_target"]

    def check(self, record: dict, answer: list[str], rendering: str) -> bool:
        return answer == [f"n{record['target']}"]

    def node_tokens(self, record: dict, rendering: str) -> list[str]:
        return list(record["idx_to_symbol"])

