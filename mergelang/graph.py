"""The IR: interned expression nodes, their structural digests, and their rendering.

Building the same expression twice gives the same Node object, so common subexpressions are
shared by construction. Source positions live in a side table (`Spans`), not in node identity.
"""

from __future__ import annotations

import hashlib
import weakref
from collections import defaultdict
from typing import Any, Callable, Iterable

from .ast import Span

_interned: "weakref.WeakValueDictionary[tuple, Node]" = weakref.WeakValueDictionary()


class Node:
    """One operation. `op` names a registry entry (or a structural op: const, load, match, layers);
    `args` are input nodes; `attrs` are static, hashable parameters as a sorted tuple of pairs."""

    __slots__ = ("op", "args", "attrs", "_hash", "_digest", "__weakref__")

    op: str
    args: tuple["Node", ...]
    attrs: tuple[tuple[str, Any], ...]

    def __new__(cls, op: str, args: Iterable["Node"] = (), attrs: dict[str, Any] | None = None) -> "Node":
        args = tuple(args)
        attr_items = tuple(sorted((attrs or {}).items()))
        key = (op, tuple(id(a) for a in args), _freeze(attr_items))
        node = _interned.get(key)
        if node is None:
            node = object.__new__(cls)
            object.__setattr__(node, "op", op)
            object.__setattr__(node, "args", args)
            object.__setattr__(node, "attrs", attr_items)
            object.__setattr__(node, "_hash", hash(key))
            object.__setattr__(node, "_digest", None)
            _interned[key] = node
        return node

    def __setattr__(self, name, value):
        raise AttributeError("Node is immutable")

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        return self is other

    def __reduce__(self):
        return (Node, (self.op, self.args, dict(self.attrs)))

    def attr(self, name: str, default: Any = None) -> Any:
        for k, v in self.attrs:
            if k == name:
                return v
        return default

    @property
    def digest(self) -> bytes:
        """A structural hash that is stable across processes and machines (unlike hash())."""
        if self._digest is None:
            h = hashlib.sha256()
            h.update(self.op.encode())
            h.update(repr(self.attrs).encode())
            for a in self.args:
                h.update(a.digest)
            object.__setattr__(self, "_digest", h.digest())
        return self._digest

    def __repr__(self) -> str:
        return render_inline(self)


def _freeze(value: Any) -> Any:
    # Distinguish 1 from 1.0 and True so that constants of different types do not intern together.
    if isinstance(value, tuple):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, float):  # -0.0 == 0.0 and nan != nan, but they are different constants
        return ("float", repr(value))
    return (type(value).__name__, value)


def with_random_key(node: Node) -> Node:
    """The node with its random-stream key fixed to the digest of its structure *as written*.

    Random ops draw from a stream keyed by this attribute, so passes that rewrite the op's inputs
    (folding, simplification, per-tensor specialization) cannot change its mask.
    """
    return Node(node.op, node.args, {**dict(node.attrs), "key": node.digest.hex()[:32]})


def const(value: float) -> Node:
    return Node("const", (), {"value": float(value)})


def walk(root: Node) -> list[Node]:
    """Every node reachable from root, inputs before users (a deterministic topological order)."""
    order: list[Node] = []
    seen: set[int] = set()
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            order.append(node)
            continue
        if id(node) in seen:
            continue
        seen.add(id(node))
        stack.append((node, True))
        stack.extend((a, False) for a in reversed(node.args) if id(a) not in seen)
    return order


def rewrite(root: Node, rule: Callable[[Node], Node | None], spans: "Spans | None" = None) -> Node:
    """Rebuild the graph bottom-up; `rule(node)` (called with already rewritten args) returns a
    replacement or None to keep the node. Each distinct node is visited once. With `spans`, a
    replacement inherits the source positions of the node it replaces."""
    done: dict[int, Node] = {}
    for node in walk(root):
        args = tuple(done[id(a)] for a in node.args)
        new = node if args == node.args else Node(node.op, args, dict(node.attrs))
        if spans is not None:
            spans.carry(node, new)  # so that a rule raising about `new` can point at the source
        replaced = rule(new)
        result = new if replaced is None else replaced
        if spans is not None:
            spans.carry(node, result)
        done[id(node)] = result
    return done[id(root)]


class Spans:
    """Side table: node → the source spans it was built from (several, after CSE)."""

    def __init__(self):
        self._spans: dict[Node, list[Span]] = defaultdict(list)
        # Where an op's argument was written, as the user should see it: inside an inlined stdlib
        # def, the user's call, with a note naming the place inside the def.
        self._args: dict[tuple[Node, int], tuple[Span, str | None]] = {}

    def add_arg(self, node: Node, index: int, span: Span, note: str | None = None) -> None:
        self._args.setdefault((node, index), (span, note))

    def arg(self, node: Node, index: int) -> tuple[Span | None, str | None]:
        return self._args.get((node, index), (None, None))

    def add(self, node: Node, span: Span | None) -> Node:
        if span is not None and span not in self._spans[node]:
            self._spans[node].append(span)
        return node

    def first(self, node: Node) -> Span | None:
        spans = self._spans.get(node)
        return spans[0] if spans else None

    def all(self, node: Node) -> list[Span]:
        return list(self._spans.get(node, ()))

    def carry(self, old: Node, new: Node) -> None:
        """A pass replaced `old` by `new`: keep old's positions for diagnostics about new."""
        if old is not new:
            for s in self._spans.get(old, ()):
                self.add(new, s)
            if old.op == new.op and len(old.args) == len(new.args):
                for i in range(len(old.args)):
                    if (old, i) in self._args:
                        self.add_arg(new, i, *self._args[(old, i)])


def _fmt_attr(v: Any) -> str:
    """Numbers as a reader writes them: 2 not 2.0, 0.1 not 0.09999999999999998 (12 significant digits)."""
    if isinstance(v, float):
        return f"{v:.12g}"
    return repr(v)


def render_inline(node: Node) -> str:
    if node.op == "const":
        return _fmt_attr(node.attr("value"))
    if node.op == "load":
        return node.attr("model") + (f"[{node.attr('tensor')}]" if node.attr("tensor") else "")
    attrs = [f"{k}={_fmt_attr(v)}" for k, v in node.attrs]
    return f"{node.op}(" + ", ".join([render_inline(a) for a in node.args] + attrs) + ")"


def _literal(value: Any) -> str:
    """A bool or string parameter as the language writes it: true, "sum"."""
    return str(value).lower() if isinstance(value, bool) else f'"{value}"'


def _label(n: Node, ids: dict["Node", str]) -> str:
    """`op arg arg name=value`: registry parameters by name, structural attributes as key=value."""
    from .ops import OPS

    if n.op == "load":
        return f"load {n.attr('model')}" + (f" tensor={n.attr('tensor')}" if n.attr("tensor") else "")
    spec = OPS.get(n.op)
    n_in, slots = spec.layout(len(n.args)) if spec else (len(n.args), [])
    parts = [ids[a] for a in n.args[:n_in]]
    for p, s in slots:
        values = [ids[a] if a.op != "const" or p.kind not in ("bool", "choice")
                  else _literal(p.convert(a.attr("value"))) for a in n.args[s]]
        parts.append(f"{p.name}=" + (f"[{', '.join(values)}]" if p.kind == "per_input" else values[0]))
    parts += [f"{k}={_fmt_attr(v)}" for k, v in n.attrs if k != "key"]  # the random key is noise to a reader
    return " ".join([n.op] + parts)


def render(root: Node, spans: Spans | None = None, name: str = "output") -> str:
    """The graph as numbered SSA-style lines, one per non-constant node, for `mergelang explain`."""
    lines = []
    ids: dict[Node, str] = {}
    for n in walk(root):
        if n.op == "const":
            ids[n] = _fmt_attr(n.attr("value"))
            continue
        ids[n] = f"%{len(lines)}"
        text = f"{ids[n]} = {_label(n, ids)}"
        where = spans.first(n) if spans else None
        lines.append(f"{text:<48} # {where}" if where else text)
    lines.append(f"{name} = {ids[root]}")
    return "\n".join(lines)


def render_dot(root: Node, name: str = "output") -> str:
    """Graphviz source for the graph."""
    out = ["digraph mergelang {", "  rankdir=BT;", '  node [shape=box, fontname="monospace"];']
    ids: dict[Node, str] = {}
    for n in walk(root):
        short = {a: _fmt_attr(a.attr("value")) if a.op == "const" else "·" for a in n.args}
        label = _fmt_attr(n.attr("value")) if n.op == "const" else _label(n, short)
        ids[n] = f"n{len(ids)}"
        out.append(f'  {ids[n]} [label="{label.replace(chr(34), chr(92) + chr(34))}"];')
        out.extend(f"  {ids[a]} -> {ids[n]};" for a in dict.fromkeys(n.args))
    out.append(f'  {name} [shape=oval];')
    out.append(f"  {ids[root]} -> {name};")
    out.append("}")
    return "\n".join(out)
