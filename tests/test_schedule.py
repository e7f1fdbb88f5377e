"""schedule.region: a region's steps in topological order, with last-use frees."""

from __future__ import annotations

import networkx as nx
from hypothesis import given, settings
from hypothesis import strategies as st
from test_optimize import expressions

from mergelang.graph import Node, walk
from mergelang.schedule import Step, is_leaf, region


def L(m: str) -> Node:
    return Node("load", (), {"model": m})


def test_a_small_region_by_hand():
    """sub(add(a, b), neg(a)): depth-first from the root the nodes come as sub, add, a, b, neg; the
    ready node first in that order gives a, b, add, neg, sub. a is last used by neg, b by add."""
    a, b = L("a"), L("b")
    add, neg = Node("add", [a, b]), Node("neg", [a])
    root = Node("sub", [add, neg])
    assert region(root) == (Step(a, (), ()), Step(b, (), ()), Step(add, (0, 1), (1,)), Step(neg, (0,), (0,)),
                            Step(root, (2, 3), (2, 3)))
    # a value computed whole ends the region: add is then a leaf, and a and b are not read for it
    assert [s.node for s in region(root, frozenset({add}))] == [add, a, neg, root]


def _networkx_order(root: Node, stops: frozenset) -> list[Node]:
    """The order networkx's lexicographical_topological_sort gives on the region's graph (an edge
    a → b where b uses a), keyed by depth-first, left-to-right rank from the root."""
    g, rank, todo = nx.DiGraph(), {}, [root]
    g.add_node(root)
    while todo:
        n = todo.pop()
        if n in rank:
            continue
        rank[n] = len(rank)
        if is_leaf(n) or n in stops:
            continue
        for a in n.args:
            g.add_edge(a, n)
        todo.extend(reversed(n.args))
    return list(nx.lexicographical_topological_sort(g, key=rank.__getitem__))


@settings(max_examples=200, deadline=None)
@given(expressions(), st.data())
def test_the_order_is_networkx_lexicographic_topological_order(graph, data):
    inner = [n for n in dict.fromkeys(walk(graph)) if not is_leaf(n) and n is not graph]
    stops = frozenset(data.draw(st.lists(st.sampled_from(inner), max_size=3)) if inner else ())
    steps = region(graph, stops)
    assert [s.node for s in steps] == _networkx_order(graph, stops)
    # every input comes before its use, and each value is freed once, at its last use
    for i, s in enumerate(steps):
        assert all(j < i for j in s.inputs)
        for j in s.free:
            assert j in s.inputs and not any(j in later.inputs for later in steps[i + 1:])
    freed = [j for s in steps for j in s.free]
    assert len(freed) == len(set(freed)) == len({j for s in steps for j in s.inputs})
