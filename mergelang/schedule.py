"""Order a tensor's elementwise region for chunked evaluation, freeing each value at its last use."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import networkx as nx

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


def region_graph(root: Node, stops: frozenset = frozenset()) -> nx.DiGraph:
    """The region under root as a networkx graph: an edge a → b when b uses a. Nodes in `stops`
    (values already computed whole) end the region like leaves."""
    g = nx.DiGraph()
    g.add_node(root)
    todo = [root]
    while todo:
        n = todo.pop()
        if is_leaf(n) or n in stops:
            continue
        for a in n.args:
            if a not in g:
                todo.append(a)
            g.add_edge(a, n)
    return g


@lru_cache(maxsize=1024)
def region(root: Node, stops: frozenset = frozenset()) -> tuple[Step, ...]:
    """A deterministic topological order of root's region, with last-use frees. A step with no
    inputs is a leaf: a load, a constant, a reduction or tensor op, or a node in `stops`.

    Graphs are interned, so every tensor whose specialized graph is the same shares one schedule.
    """
    g = region_graph(root, stops)
    rank = {n: i for i, n in enumerate(_first_visit(root, stops))}
    order = list(nx.lexicographical_topological_sort(g, key=rank.__getitem__))
    position = {n: i for i, n in enumerate(order)}

    def inner(n: Node) -> bool:
        return not is_leaf(n) and n not in stops

    last_use = {position[a]: i for i, n in enumerate(order) if inner(n) for a in n.args}
    frees: dict[int, list[int]] = {}
    for value, at in last_use.items():
        frees.setdefault(at, []).append(value)
    return tuple(Step(n, tuple(position[a] for a in n.args) if inner(n) else (), tuple(sorted(frees.get(i, ()))))
                 for i, n in enumerate(order))


def _first_visit(root: Node, stops: frozenset) -> list[Node]:
    """Region nodes in depth-first, left-to-right order: the tie-break of the topological sort."""
    seen, order, stack = set(), [], [root]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        order.append(n)
        if not is_leaf(n) and n not in stops:
            stack.extend(reversed(n.args))
    return order
