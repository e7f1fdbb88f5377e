"""optimize(g) computes the same bits as g (hypothesis over random expression graphs)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergelang.check import TensorPlan
from mergelang.execute import ExecOptions, evaluate_in_memory
from mergelang.graph import Node, const, walk, with_random_key
from mergelang.optimize import fold, optimize, simplify

MODELS = ("a", "b", "c")
SHAPE = (7, 5)
DATA = {m: torch.randn(SHAPE, generator=torch.Generator().manual_seed(i)) for i, m in enumerate(MODELS)}
DATA["c"].view(-1)[:4] = torch.tensor([0.0, -0.0, 1e-30, -3e38])  # signed zeros, tiny and huge values

constants = st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, 2.0, 3.0, 0.1])


def expressions():
    leaves = st.one_of(st.sampled_from([Node("load", (), {"model": m}) for m in MODELS]), constants.map(const))

    def extend(children):
        binary = st.tuples(st.sampled_from(["add", "sub", "mul", "div"]), children, children).map(
            lambda t: Node(t[0], [t[1], t[2]]))
        unary = children.map(lambda x: Node("neg", [x]))
        variadic = st.tuples(st.sampled_from(["avg", "sum"]), st.lists(children, min_size=1, max_size=3)).map(
            lambda t: Node(t[0], t[1]))
        dare = st.tuples(children, st.sampled_from([0.0, 0.5, 0.9]), st.integers(0, 2)).map(
            lambda t: with_random_key(Node("dare", [t[0], const(t[1]), const(t[2])])))
        return st.one_of(binary, unary, variadic, dare)

    return st.recursive(leaves, extend, max_leaves=12).filter(
        lambda n: any(x.op == "load" for x in walk(n)) and _dare_on_tensors(n))


def _dare_on_tensors(root: Node) -> bool:
    return all(any(x.op == "load" for x in walk(n.args[0])) for n in walk(root) if n.op == "dare")


def evaluate(graph: Node, chunk: int) -> torch.Tensor:
    tp = TensorPlan("model.layers.0.mlp.up_proj.weight", graph, SHAPE, "F32")
    return evaluate_in_memory(tp, DATA, ExecOptions(seed=9, chunk=chunk))


@settings(max_examples=150, deadline=None)
@given(expressions(), st.sampled_from([1, 5, 12, 35]))
def test_optimized_graph_gives_the_same_bits(graph, chunk):
    try:
        optimized = optimize(graph)
    except Exception as e:  # division of constants by zero is a user error, found statically
        assert "division by zero" in str(getattr(e, "message", e))
        return
    expected = evaluate(graph, 35)
    got = evaluate(optimized, chunk)
    assert torch.equal(got.view(torch.int32), expected.view(torch.int32)), (graph, optimized)


def test_fold_and_simplify_examples():
    a = Node("load", (), {"model": "a"})
    assert fold(Node("mul", [a, Node("div", [const(1), Node("add", [const(1), const(1)])])])) is Node(
        "mul", [a, const(0.5)])
    assert simplify(Node("mul", [a, const(1)])) is a
    assert simplify(Node("add", [a, const(0)])) is Node("add", [a, const(0)])  # -0.0 + 0 is +0.0: not exact
    assert simplify(with_random_key(Node("dare", [a, const(0), const(3)]))) is a
    assert optimize(Node("avg", [Node("neg", [Node("neg", [a])])])) is a
