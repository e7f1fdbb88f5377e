"""A YAML document as plain values that remember where they were written.

PyYAML's composer gives every node its start and end marks; the importer needs them to point a
diagnostic at the key it cannot translate. `load_all` composes each document of a file and returns
it as `YMap` / `YSeq` / `YScalar` values, each with the span of its text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from .ast import Span
from .diagnostics import SYNTAX, Diagnostic, MergelangError


@dataclass
class YScalar:
    value: Any  # str, int, float, bool or None, as YAML's safe loader reads it
    span: Span


@dataclass
class YSeq:
    items: list
    span: Span


@dataclass
class YMap:
    """A mapping with string keys, in the order written; `keys` holds each key's own span."""

    items: dict
    keys: dict
    span: Span

    def get(self, key: str, default=None):
        return self.items.get(key, default)

    def __contains__(self, key: str) -> bool:
        return key in self.items


def _span(file: str, node: yaml.Node) -> Span:
    start, end = node.start_mark, node.end_mark
    return Span(file, start.line + 1, start.column + 1, end.line + 1, end.column + 1)


def plain(value):
    """The value without positions (lists and dicts of scalars)."""
    if isinstance(value, YScalar):
        return value.value
    if isinstance(value, YSeq):
        return [plain(v) for v in value.items]
    if isinstance(value, YMap):
        return {k: plain(v) for k, v in value.items.items()}
    return value


def _convert(file: str, node: yaml.Node, constructor: yaml.constructor.SafeConstructor):
    span = _span(file, node)
    if isinstance(node, yaml.ScalarNode):
        return YScalar(constructor.construct_object(node, deep=True), span)
    if isinstance(node, yaml.SequenceNode):
        return YSeq([_convert(file, item, constructor) for item in node.value], span)
    items, keys = {}, {}
    for key_node, value_node in node.value:
        key_span = _span(file, key_node)
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
            raise MergelangError(Diagnostic(SYNTAX, "expected a plain key here", key_span,
                                            help="write each key out; YAML merge keys (`<<`) are not read"))
        key = constructor.construct_object(key_node, deep=True)
        key = str(key).lower() if isinstance(key, bool) else str(key)
        if key in items:
            raise MergelangError(Diagnostic(SYNTAX, f"the key `{key}` is written twice", key_span,
                                            notes=(f"first written at {keys[key]}",)))
        items[key] = _convert(file, value_node, constructor)
        keys[key] = key_span
    return YMap(items, keys, span)


def load_all(text: str, file: str) -> list[YMap | YScalar | YSeq]:
    """Every document of a YAML text, with positions; malformed YAML is a diagnostic at line:col."""
    constructor = yaml.constructor.SafeConstructor()
    try:
        nodes = [n for n in yaml.compose_all(text, Loader=yaml.SafeLoader) if n is not None]
        return [_convert(file, node, constructor) for node in nodes]
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        span = Span(file, mark.line + 1, mark.column + 1, mark.line + 1, mark.column + 2) if mark else None
        problem = " ".join(p for p in (e.problem, e.context) if p)
        raise MergelangError(Diagnostic(SYNTAX, f"malformed YAML: {problem or e}", span,
                                        help="fix the YAML syntax at this position")) from None
    except yaml.YAMLError as e:
        raise MergelangError(Diagnostic(SYNTAX, f"malformed YAML: {e}")) from None
