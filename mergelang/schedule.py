"""Order a tensor's graph for evaluation and find where each value is used for the last time."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import networkx as nx

from .graph import Node, to_networkx


@dataclass(frozen=True)
class Step:
    node: Node
    inputs: tuple[int, ...]  # indices of earlier steps
    free: tuple[int, ...]  # values to drop after this step (their last use)


@lru_cache(maxsize=1024)
def schedule(root: Node) -> tuple[Step, ...]:
    """A topological order (deterministic) with last-use frees, so only live values are held.

    Graphs are interned, so every tensor whose specialized graph is the same shares one schedule.
    """
    g = to_networkx(root)
    order = [g.nodes[v]["node"] for v in nx.lexicographical_topological_sort(g)]
    position = {node: i for i, node in enumerate(order)}
    last_use: dict[int, int] = {}
    for i, node in enumerate(order):
        for a in node.args:
            last_use[position[a]] = i
    frees: dict[int, list[int]] = {}
    for value, at in last_use.items():
        frees.setdefault(at, []).append(value)
    return tuple(
        Step(node, tuple(position[a] for a in node.args), tuple(sorted(frees.get(i, ()))))
        for i, node in enumerate(order)
    )
