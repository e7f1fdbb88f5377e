"""Order a tensor's elementwise region for chunked evaluation, freeing each value at its last use."""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from functools import lru_cache

from .graph import Node
from .ops import OPS


@dataclass(frozen=True)
class Step:
    node: Node
    inputs: tuple[int, ...]  # positions of earlier steps; empty for a leaf
    free: tuple[int, ...]  # values to drop after this step (their last use)


def is_leaf(node: Node) -> bool:
    """Loads, constants, reductions and tensor ops end a region; elementwise ops continue it."""
    return node.op in ("const", "load") or OPS[node.op].kind != "elementwise"


@lru_cache(maxsize=1024)
def region(root: Node, stops: frozenset = frozenset()) -> tuple[Step, ...]:
    """A deterministic topological order of root's region, with last-use frees. A step with no
    inputs is a leaf: a load, a constant, a reduction or tensor op, or a node in `stops` (values
    already computed whole), which end the region.

    Graphs are interned, so every tensor whose specialized graph is the same shares one schedule.
    """
    def inner(n: Node) -> bool:
        return not is_leaf(n) and n not in stops

    order = _order(root, inner)
    position = {n: i for i, n in enumerate(order)}
    last_use = {position[a]: i for i, n in enumerate(order) if inner(n) for a in n.args}
    frees: dict[int, list[int]] = {}
    for value, at in last_use.items():
        frees.setdefault(at, []).append(value)
    return tuple(Step(n, tuple(position[a] for a in n.args) if inner(n) else (), tuple(sorted(frees.get(i, ()))))
                 for i, n in enumerate(order))


def _order(root: Node, inner) -> list[Node]:
    """The region's nodes, each after its inputs; of the nodes ready at each point, the first in
    depth-first, left-to-right order from the root (`_first_visit`) goes first. Kahn's algorithm
    with a heap of ready nodes by that rank: networkx's lexicographical_topological_sort with the
    rank as key gives the same order (tests/test_schedule.py), but importing networkx took 0.1-0.14 s
    of every run here (its backends' entry points are looked up at import), a fifth of the
    benchmark's whole I/O floor, for this one sort."""
    nodes = _first_visit(root, inner)
    rank = {n: i for i, n in enumerate(nodes)}
    consumers: dict[Node, list[Node]] = {n: [] for n in nodes}
    waiting: dict[Node, int] = {}  # node → its inputs not yet ordered
    for n in nodes:
        args = dict.fromkeys(n.args) if inner(n) else {}
        waiting[n] = len(args)
        for a in args:
            consumers[a].append(n)
    ready = [rank[n] for n in nodes if not waiting[n]]
    heapq.heapify(ready)
    order = []
    while ready:
        n = nodes[heapq.heappop(ready)]
        order.append(n)
        for c in consumers[n]:
            waiting[c] -= 1
            if not waiting[c]:
                heapq.heappush(ready, rank[c])
    return order


def _first_visit(root: Node, inner) -> list[Node]:
    """Region nodes in depth-first, left-to-right order: the tie-break of the topological sort."""
    seen, order, stack = set(), [], [root]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        order.append(n)
        if inner(n):
            stack.extend(reversed(n.args))
    return order
