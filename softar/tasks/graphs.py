"""ProsQA-style graphs: random DAGs in which one option is reachable from the root and the other is not (two
isomorphic twins, so that no local statistic tells them apart), and the breadth-first facts every task and probe
reads from them (distances, frontiers, a shortest chain)."""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass

from softar import SoftarError

# chain lengths (edges from the root to the target) and their probabilities: 3 to 6 steps, mean 3.82
CHAIN_LENGTHS = {3: 0.45, 4: 0.35, 5: 0.13, 6: 0.07}
NODES = (14, 28)  # nodes per graph, the root (the person) included; mean about 23
EDGES = (16, 54)  # mean about 36


@dataclass(frozen=True)
class Graph:
    """Nodes 0..n-1 with directed edges (a, b), a root, a reachable target, an unreachable negative target, and the
    root of the twin that holds the negative target."""

    n: int
    edges: list[tuple[int, int]]
    root: int
    target: int
    neg_target: int
    twin_root: int


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


def has_cycle(n: int, edges: list[tuple[int, int]]) -> bool:
    """Whether the directed graph has a cycle (Kahn's algorithm: some node never reaches in-degree 0)."""
    kids, indeg = children(n, edges), [0] * n
    for _, b in edges:
        indeg[b] += 1
    queue, seen = deque(v for v in range(n) if indeg[v] == 0), 0
    while queue:
        a = queue.popleft()
        seen += 1
        for b in kids[a]:
            indeg[b] -= 1
            if indeg[b] == 0:
                queue.append(b)
    return seen < n


def check_graph(record: dict, dag: bool) -> None:
    """Distinct node names, no self-loop or repeated edge, acyclic when `dag`, and the target reachable from the
    root, a different node from it."""
    sym, edges = record["idx_to_symbol"], [tuple(e) for e in record["edges"]]
    if len(set(sym)) != len(sym):
        raise SoftarError("idx_to_symbol names a node twice")
    if any(a == b for a, b in edges) or len(set(edges)) != len(edges):
        raise SoftarError("edges hold a self-loop or a repeated edge")
    if dag and has_cycle(len(sym), edges):
        raise SoftarError("edges hold a cycle; the task's graphs are acyclic")
    if record["target"] == record["root"] or distances(len(sym), edges, record["root"])[record["target"]] is None:
        raise SoftarError("the target is not reachable from the root")


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


def twin_graph(rng: random.Random) -> Graph:
    """A DAG like Coconut's ProsQA graphs (14-28 nodes, 16-54 edges, a 3-6 step chain), built leak-free: two
    isomorphic components, each hanging from its own person. In the root's component each node has a level, edges
    climb at most one level, and a chain guarantees a node at exactly distance L, the target; the negative target is
    the target's image in the twin. Every statistic that ignores who the question is about (degrees, the degrees of
    parents and children, grandparents, ...) is therefore equal for both options: only search from the root tells
    them apart (`softar.tasks.audit` measures it)."""
    while True:  # until a twin has enough edges (a short twin with a long chain may not)
        k = NODES[0] // 2 + sum(rng.random() < 0.643 for _ in range((NODES[1] - NODES[0]) // 2))  # nodes per twin
        L = rng.choices(list(CHAIN_LENGTHS), weights=list(CHAIN_LENGTHS.values()))[0]
        level = {0: 0}
        chain = [0, *rng.sample(range(1, k), L)]
        for i, node in enumerate(chain):
            level[node] = i
        for node in range(1, k):
            level.setdefault(node, rng.randint(1, L + 1))
        order = {node: (level[node], rng.random()) for node in range(k)}  # a topological order
        edges = set(zip(chain, chain[1:], strict=False))
        candidates = [(a, b) for a in range(k) for b in range(1, k)
                      if (a, b) not in edges and order[a] < order[b] and level[b] - level[a] <= 1]
        m = min(max(round(1.57 * k + rng.gauss(0, 2.1)), EDGES[0] // 2), EDGES[1] // 2)
        for e in rng.sample(candidates, len(candidates)):  # in random order, until there are m edges
            if len(edges) >= m:
                break
            if not (e[0] == 0 and sum(a == 0 for a, _ in edges) >= 3):  # the person is at most 3 things
                edges.add(e)
        if len(edges) < EDGES[0] // 2:
            continue
        dist = distances(k, sorted(edges), 0)
        target = rng.choice([v for v in range(k) if dist[v] == L])
        twin = sorted(edges) + [(a + k, b + k) for a, b in sorted(edges)]
        return Graph(2 * k, twin, 0, target, target + k, k)


def relabel(g: Graph, rng: random.Random) -> Graph:
    """The same graph under a random permutation of node ids, edges in random order: ids and edge order carry no
    hint of the structure."""
    perm = rng.sample(range(g.n), g.n)
    edges = [(perm[a], perm[b]) for a, b in g.edges]
    rng.shuffle(edges)
    return Graph(g.n, edges, perm[g.root], perm[g.target], perm[g.neg_target], perm[g.twin_root])


def twin_chains(rng: random.Random, nodes: int, depth: int) -> Graph:
    """The depth-controlled twins (`softar.tasks.twins`): two isomorphic components of `nodes` nodes, each hanging
    from its own person, in which every node has at most one child (edges point toward one sink). The person's
    chain of `depth` edges ends at the sink, the target; every other node points at a node after the person (a
    tributary), so the person reaches only its chain, and the negative target is the twin's sink. Each step from
    the person is one lookup (its only child), so `depth` counts exactly the hops a question needs."""
    if not 1 <= depth < nodes:
        raise SoftarError(f"twins: depth {depth} needs 1 <= depth < nodes ({nodes})")
    child = {i: i + 1 for i in range(depth)} | {i: rng.randrange(1, i) for i in range(depth + 1, nodes)}
    edges = sorted(child.items())
    twin = edges + [(a + nodes, b + nodes) for a, b in edges]
    return Graph(2 * nodes, twin, 0, depth, depth + nodes, nodes)
