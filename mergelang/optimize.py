"""Graph → graph passes, run in the order of PASSES until nothing changes.

Common subexpressions need no pass: nodes are interned, so rebuilding a graph merges equal
subtrees by construction. Every rewrite here is exact: the optimized graph computes the same
bits as the original (so no `x + 0 → x`, which turns -0.0 into +0.0, and no `x * 0 → 0`).
"""

from __future__ import annotations

import math

from .graph import Node, Spans, const, rewrite
from .ops import OPS, KernelContext


class FoldError(Exception):
    """Constant folding hit an error the user must see (division by zero)."""

    def __init__(self, node: Node, message: str):
        self.node, self.message = node, message


def _fold_rule(node: Node) -> Node | None:
    if node.op == "div" and _is(node.args[1], 0.0):
        raise FoldError(node, "division by zero")
    spec = OPS.get(node.op)
    if spec is None or spec.random or spec.kind != "elementwise" or not node.args:
        return None
    if any(a.op != "const" for a in node.args):
        return None
    inputs, params = spec.bind([a.attr("value") for a in node.args])
    try:
        result = spec.kernel(KernelContext(), *inputs, **params)
    except ZeroDivisionError:
        raise FoldError(node, "division by zero") from None
    return const(float(result))


def fold(root: Node, spans: Spans | None = None) -> Node:
    """Evaluate operations whose inputs are all constants; a division by a constant 0 is an error.

    Before: mul(load ft, div(1, add(1, 1)))
    After:  mul(load ft, 0.5)
    """
    return rewrite(root, _fold_rule, spans)


def _is(node: Node, value: float) -> bool:
    """node is the constant `value`, sign of zero included (x - (-0.0) is x + 0.0, not x)."""
    return node.op == "const" and node.attr("value") == value and \
        math.copysign(1.0, node.attr("value")) == math.copysign(1.0, value)


def _simplify_rule(node: Node) -> Node | None:
    a = node.args
    if node.op == "mul" and _is(a[1], 1.0):
        return a[0]
    if node.op == "mul" and _is(a[0], 1.0):
        return a[1]
    if node.op == "div" and _is(a[1], 1.0):
        return a[0]
    if node.op == "sub" and _is(a[1], 0.0):
        return a[0]
    if node.op == "neg" and a[0].op == "neg":
        return a[0].args[0]
    if node.op in ("avg", "sum") and len(a) == 1:
        return a[0]
    if node.op == "dare" and _is(a[1], 0.0):  # keeps every entry, unscaled
        return a[0]
    if node.op == "ifelse" and a[2].op == "const":  # a method's boolean option, known statically
        return a[0] if a[2].attr("value") else a[1]
    return None


def simplify(root: Node, spans: Spans | None = None) -> Node:
    """Remove operations that leave their input unchanged, bit for bit.

    Before: avg(dare(mul(sub(load ft, load base), 1), p=0, seed=0))
    After:  sub(load ft, load base)
    Before: ifelse(mul(x, l1_ratio(y, x)), x, cond=false)
    After:  x
    """
    return rewrite(root, _simplify_rule, spans)


PASSES = (fold, simplify)


def optimize(root: Node, spans: Spans | None = None, max_rounds: int = 10) -> Node:
    for _ in range(max_rounds):
        before = root
        for p in PASSES:
            root = p(root, spans)
        if root is before:
            break
    return root
