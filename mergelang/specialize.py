"""Resolve per-tensor values for one tensor name: `match tensor` picks its arm, `layers(...)`
becomes the number mergekit's gradient interpolation gives at that tensor's layer."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from .graph import Node, Spans, const, rewrite

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|layer)\.(\d+)\.")


def layer_index(tensor: str) -> int | None:
    """The layer a tensor belongs to (`model.layers.3.mlp.up_proj.weight` → 3), or None."""
    m = _LAYER.search(tensor)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class LayerInfo:
    num_layers: int

    @classmethod
    def from_model(cls, tensor_names, config: dict | None) -> "LayerInfo":
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if config and isinstance(config.get(key), int):
                return cls(config[key])
        found = [i for i in map(layer_index, tensor_names) if i is not None]
        return cls(max(found) + 1 if found else 0)

    def t(self, tensor: str) -> float:
        """Position in the layer stack: layer/(num_layers-1); 0 outside the stack, 1 for a one-layer stack."""
        i = layer_index(tensor)
        if i is None:
            return 0.0
        return i / (self.num_layers - 1) if self.num_layers > 1 else 1.0


def interpolate(values: list[float], t: float) -> float:
    """Piecewise-linear over evenly spaced points on [0, 1], the way mergekit evaluates a gradient."""
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * values[i0] + frac * values[i1]


@lru_cache(maxsize=256)
def _pattern(pattern: str) -> re.Pattern:
    if "*" not in pattern:
        return re.compile(re.escape(pattern))
    return re.compile("^" + ".*".join(map(re.escape, pattern.split("*"))) + "$")


def matches(pattern: str, tensor: str) -> bool:
    """A pattern without `*` is a substring test (like mergekit's filter); with `*` it globs the full name."""
    if "*" not in pattern:
        return pattern in tensor
    return _pattern(pattern).match(tensor) is not None


class NoMatchingArm(Exception):
    def __init__(self, node: Node, tensor: str):
        self.node, self.tensor = node, tensor


class NotANumber(Exception):
    """A `layers` value that is not constant for this tensor (cannot happen after folding)."""


def specialize(root: Node, tensor: str, layers: LayerInfo, spans: Spans | None = None) -> Node:
    """The graph for one tensor: no `match` or `layers` node remains.

    For "model.layers.1.mlp.up_proj.weight" in a 3-layer model (t = 0.5):
    Before: mul(load ft, match(0.25, layers(0, 1), patterns=("embed", None)))
    After:  mul(load ft, 0.5)
    """
    from .optimize import fold

    def rule(node: Node) -> Node | None:
        if node.op == "match":
            for pattern, branch in zip(node.attr("patterns"), node.args):
                if pattern is None or matches(pattern, tensor):
                    return branch
            raise NoMatchingArm(node, tensor)
        if node.op == "layers":
            args = [fold(a) for a in node.args]
            if any(a.op != "const" for a in args):
                raise NotANumber(node)
            return const(interpolate([a.attr("value") for a in args], layers.t(tensor)))
        return None

    return rewrite(root, rule, spans)
