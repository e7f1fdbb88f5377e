"""The surface syntax as frozen dataclasses. Every node carries the source span it came from."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path


@dataclass(frozen=True)
class Span:
    """A region of a source file: 1-based line and column, end exclusive."""

    file: str
    line: int
    col: int
    end_line: int
    end_col: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"


@dataclass(frozen=True)
class Source:
    """A spec's text and where it came from; `name` is how diagnostics refer to it."""

    name: str
    text: str
    folder: Path

    def line(self, n: int) -> str:
        lines = self.text.splitlines()
        return lines[n - 1] if 0 < n <= len(lines) else ""


class Node:
    span: Span


@dataclass(frozen=True)
class Number(Node):
    value: float | int
    span: Span


@dataclass(frozen=True)
class String(Node):
    value: str
    span: Span


@dataclass(frozen=True)
class Bool(Node):
    value: bool
    span: Span


@dataclass(frozen=True)
class Name(Node):
    id: str
    span: Span


@dataclass(frozen=True)
class List(Node):
    items: tuple[Node, ...]
    span: Span


@dataclass(frozen=True)
class Keyword:
    name: str
    value: Node
    span: Span  # the `name=value` pair


@dataclass(frozen=True)
class Call(Node):
    func: Name
    args: tuple[Node, ...]
    kwargs: tuple[Keyword, ...]
    span: Span


@dataclass(frozen=True)
class BinOp(Node):
    op: str  # one of + - * /
    left: Node
    right: Node
    span: Span


@dataclass(frozen=True)
class Neg(Node):
    operand: Node
    span: Span


@dataclass(frozen=True)
class MatchArm:
    pattern: String | None  # None is the `_` arm
    value: Node
    span: Span


@dataclass(frozen=True)
class Match(Node):
    arms: tuple[MatchArm, ...]
    span: Span


@dataclass(frozen=True)
class Param:
    name: str
    default: Node | None
    span: Span


@dataclass(frozen=True)
class Assign(Node):
    name: Name
    value: Node
    span: Span


@dataclass(frozen=True)
class Output(Node):
    value: Node
    span: Span
    options: tuple[Keyword, ...] = ()  # `output EXPR, tokenizer=base, dtype="bf16"`


@dataclass(frozen=True)
class Def(Node):
    name: Name
    params: tuple[Param, ...]
    body: Node
    span: Span


@dataclass(frozen=True)
class Program:
    statements: tuple[Node, ...]
    source: Source


def dump(node: object, indent: int = 0) -> str:
    """An indented, position-annotated rendering used by golden tests and `explain --ast`."""
    pad = "  " * indent
    if isinstance(node, Program):
        return "\n".join(dump(s, indent) for s in node.statements)
    if isinstance(node, (tuple, list)):
        return "\n".join(dump(x, indent) for x in node)
    kind = type(node).__name__
    span = getattr(node, "span", None)
    where = f" @{span.line}:{span.col}-{span.end_line}:{span.end_col}" if span else ""
    leaves, children = [], []
    for f in fields(node):  # type: ignore[arg-type]
        if f.name == "span":
            continue
        value = getattr(node, f.name)
        if isinstance(value, (Node, Keyword, MatchArm, Param)):
            children.append((f.name, [value]))
        elif isinstance(value, tuple):
            children.append((f.name, list(value)))
        elif value is not None or f.name != "default":
            leaves.append(f"{f.name}={value!r}")
    head = f"{pad}{kind}{where}" + (" " + " ".join(leaves) if leaves else "")
    lines = [head]
    for name, items in children:
        if not items:
            continue
        lines.append(f"{pad}  .{name}")
        lines.extend(dump(item, indent + 2) for item in items)
    return "\n".join(lines)
