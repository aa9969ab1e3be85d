"""ProsQA-style graphs: random DAGs in which one option is reachable from the root and the other is not, and the
breadth-first facts every task and probe reads from them (distances, frontiers, a shortest chain)."""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass

# chain lengths (edges from the root to the target) and their probabilities: 3 to 6 steps, mean 3.82
CHAIN_LENGTHS = {3: 0.45, 4: 0.35, 5: 0.13, 6: 0.07}
NODES = (14, 28)  # nodes per graph, the root (the person) included; mean about 23
EDGES = (16, 54)  # mean about 36


@dataclass(frozen=True)
class Graph:
    """Nodes 0..n-1 with directed edges (a, b), a root, a reachable target and an unreachable negative target."""

    n: int
    edges: list[tuple[int, int]]
    root: int
    target: int
    neg_target: int


def children(n: int, edges: list[tuple[int, int]]) -> list[list[int]]:
    out: list[list[int]] = [[] for _ in range(n)]
    for a, b in edges:
        out[a].append(b)
    return out


def distances(n: int, edges: list[tuple[int, int]], root: int) -> list[int | None]:
    """Breadth-first distance from the root to every node (None: unreachable)."""
    kids, dist = children(n, edges), [None] * n
    dist[root] = 0
    queue = deque([root])
    while queue:
        a = queue.popleft()
        for b in kids[a]:
            if dist[b] is None:
                dist[b] = dist[a] + 1
                queue.append(b)
    return dist


def frontiers(n: int, edges: list[tuple[int, int]], root: int) -> list[set[int]]:
    """frontiers[d]: the nodes at breadth-first distance d from the root (d = 0 is the root)."""
    dist = distances(n, edges, root)
    out: list[set[int]] = [set() for _ in range(max((d for d in dist if d is not None), default=0) + 1)]
    for node, d in enumerate(dist):
        if d is not None:
            out[d].add(node)
    return out


def shortest_chain(n: int, edges: list[tuple[int, int]], root: int, target: int) -> list[int] | None:
    """The nodes of a shortest path root -> target (the first one breadth-first search finds), or None."""
    kids, parent = children(n, edges), {root: root}
    queue = deque([root])
    while queue:
        a = queue.popleft()
        for b in kids[a]:
            if b not in parent:
                parent[b] = a
                queue.append(b)
    if target not in parent:
        return None
    path = [target]
    while path[-1] != root:
        path.append(parent[path[-1]])
    return path[::-1]


def random_graph(rng: random.Random) -> Graph:
    """A DAG like Coconut's ProsQA graphs. The nodes after the root split into a side the root reaches (each node on
    a level, edges climb at most one level, so a node at level L is at most L steps away, and a chain guarantees one
    at exactly L) and a side it cannot reach (edges into it come only from itself). The target is a node at
    distance L and the negative target an unreachable one with the same in- and out-degree, so neither how many
    facts mention an option nor which way they point tells the answer."""
    while True:
        n = NODES[0] + sum(rng.random() < 0.65 for _ in range(NODES[1] - NODES[0]))
        L = rng.choices(list(CHAIN_LENGTHS), weights=list(CHAIN_LENGTHS.values()))[0]
        n_reach = max(L + 2, (n - 1) // 2 + rng.randint(-1, 1))
        reach, unreach = list(range(1, 1 + n_reach)), list(range(1 + n_reach, n))
        level = {0: 0}
        chain = [0, *rng.sample(reach, L)]
        for i, node in enumerate(chain):
            level[node] = i
        for node in reach:
            level.setdefault(node, rng.randint(1, L + 1))
        order = {node: (level[node], rng.random()) for node in reach}  # a topological order of the reachable side
        u_order = {node: i for i, node in enumerate(rng.sample(unreach, len(unreach)))}
        edges = set(zip(chain, chain[1:], strict=False))
        u_chain = sorted(rng.sample(unreach, min(len(unreach), max(2, L - 1))), key=u_order.get)
        edges |= set(zip(u_chain, u_chain[1:], strict=False))
        candidates = [(0, b) for b in reach if level[b] == 1]
        candidates += [(a, b) for a in reach for b in reach if order[a] < order[b] and level[b] - level[a] <= 1]
        candidates += [(a, b) for a in unreach for b in unreach if u_order[a] < u_order[b]]
        candidates += [(a, b) for a in unreach for b in reach]  # into the reachable side: reachability unchanged
        m = min(max(round(1.57 * n + rng.gauss(0, 3)), EDGES[0]), EDGES[1])
        candidates = [e for e in candidates if e not in edges]
        for e in rng.sample(candidates, len(candidates)):  # in random order, until there are m edges
            if len(edges) >= m:
                break
            if not (e[0] == 0 and sum(a == 0 for a, _ in edges) >= 3):  # the person is at most 3 things
                edges.add(e)
        edges = sorted(edges)
        dist = distances(n, edges, 0)
        deg = {v: (sum(b == v for _, b in edges), sum(a == v for a, _ in edges)) for v in range(n)}  # (in, out)
        pairs = [(t, u) for t in range(n) if dist[t] == L for u in unreach if dist[u] is None and deg[t] == deg[u]]
        if pairs:
            target, neg = rng.choice(pairs)
            return Graph(n, edges, 0, target, neg)


def relabel(g: Graph, rng: random.Random) -> Graph:
    """The same graph under a random permutation of node ids, edges in random order: ids and edge order carry no
    hint of the structure."""
    perm = rng.sample(range(g.n), g.n)
    edges = [(perm[a], perm[b]) for a, b in g.edges]
    rng.shuffle(edges)
    return Graph(g.n, edges, perm[g.root], perm[g.target], perm[g.neg_target])
