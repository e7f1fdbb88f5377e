"""Layer stacking: `layer_range(X, START, END)` and `stack(PART, ...)`, resolved per output tensor.

A value has a *layer stack*: a model has its config's layers, `layer_range(X, s, e)` has e - s
(X's layers s..e-1, renumbered from 0), `stack(P1, P2, ...)` has the sum of its parts' (numbering
runs on), and any other operation has the (equal) layer count of its operands. This is mergekit's
`slices`: a slice is a part, its sources are the `layer_range`s inside it.

For output tensor `model.layers.K.x`, `specialize_stacked` walks the graph from the root with K:
a `stack` hands K to the part that holds it, as the part's own layer K - offset; `layer_range(X, s, e)`
hands s + k to X; a `load` reads `model.layers.{k}.x` from its model (the load then carries that
name in its `tensor` attribute). `layers(...)` interpolates over the position in the innermost part
(t = k / (n - 1) in a part of n layers; the whole output when there is no `stack`), which is the `t`
mergekit gives a gradient inside a slice. `match tensor` sees the output tensor's name, as mergekit's
`filter` does.

Tensors outside the layer stack come, as in mergekit, from the first part (embeddings: `embed_tokens`,
`wte`, ...) or the last part (the final norm, `lm_head`, everything else), evaluated with t = 0.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .diagnostics import RANGE, SHAPE, TYPE
from .graph import Node, Spans, const, walk
from .ops import OPS
from .optimize import fold
from .specialize import LayerInfo, NoMatchingArm, NotANumber, interpolate, layer_index, matches

STRUCTURAL_OPS = ("stack", "layer_range")
# Tensors outside the layer stack that belong before it (the input embeddings); the rest belong after.
PRE_MARKERS = ("embed_tokens", "wte", "wpe", "word_embeddings", "embed_in", "tok_embeddings", "embed_positions",
               "position_embeddings")
_LAYER_NUMBER = re.compile(r"((?:^|\.)(?:layers|h|blocks|block|layer)\.)(\d+)(\.)")


def is_stacked(root: Node) -> bool:
    return any(n.op in STRUCTURAL_OPS for n in walk(root))


def is_pre(tensor: str) -> bool:
    """Whether a tensor outside the layer stack comes before it (from a stack's first part)."""
    return any(m in tensor for m in PRE_MARKERS)


def with_layer(tensor: str, layer: int) -> str:
    """`model.layers.3.mlp.up_proj.weight` with layer 7 → `model.layers.7.mlp.up_proj.weight`."""
    return _LAYER_NUMBER.sub(lambda m: f"{m.group(1)}{layer}{m.group(3)}", tensor, count=1)


class StackError(Exception):
    """A problem with the layer structure, found from the headers (reported as a Diagnostic)."""

    def __init__(self, code: str, node: Node, message: str, *, arg: int | None = None, help: str | None = None):
        super().__init__(message)
        self.code, self.node, self.message, self.arg, self.help = code, node, message, arg, help


@dataclass
class Stacking:
    """The layer structure of one output graph, given each model's layer count."""

    root: Node
    model_layers: dict[str, int]  # model key → its number of layers
    spans: Spans | None = None
    _depth: dict[Node, int | None] = field(default_factory=dict)

    def depth(self, node: Node) -> int | None:
        """The node's number of layers (None for a number); raises StackError for a mismatch."""
        for n in walk(node):
            if n in self._depth:
                continue
            if n.op == "const" or n.op == "layers":
                d = None
            elif n.op == "load":
                d = self.model_layers[n.attr("model")]
            elif n.op == "layer_range":
                inner, start, end = self._depth[n.args[0]], n.attr("start"), n.attr("end")
                if end > inner:
                    what = (f"`{n.args[0].attr('model')}` has {inner} layers" if n.args[0].op == "load"
                            else f"its value has {inner} layers")
                    raise StackError(RANGE, n, f"END of `layer_range` is {end}, but {what}", arg=2,
                                     help=f"layers are numbered 0..{inner - 1}; END is exclusive, at most {inner}")
                d = end - start
            elif n.op == "stack":
                d = sum(self._depth[p] for p in n.args)
            else:
                found = [(self._depth[a], a) for a in n.args if self._depth[a] is not None]
                counts = list(dict.fromkeys(c for c, _ in found))
                if len(counts) > 1:
                    raise StackError(SHAPE, n, f"the operands of `{n.op}` have different numbers of layers: "
                                               f"{counts[0]} and {counts[1]}",
                                     help="restrict them to equal lengths with `layer_range(X, START, END)`")
                d = counts[0] if counts else None
            self._depth[n] = d
        return self._depth[node]

    @property
    def num_layers(self) -> int:
        return self.depth(self.root) or 0

    def source_of(self, layer: int) -> tuple[str, int]:
        """(model, layer) that output layer `layer` first reads: where its tensor names come from."""
        node, index = self.root, layer
        while node.op != "load":
            if node.op == "stack":
                for part in node.args:
                    if index < self.depth(part):
                        node = part
                        break
                    index -= self.depth(part)
            elif node.op == "layer_range":
                node, index = node.args[0], index + node.attr("start")
            else:
                node = next(a for a in node.args if self.depth(a) is not None)
        return node.attr("model"), index

    def part_models(self, node: Node) -> list[str]:
        """The model each part of a `stack` node takes its tensors outside the layer stack from."""
        return [next(n.attr("model") for n in walk(p) if n.op == "load") for p in node.args]

    def specialize(self, tensor: str) -> Node:
        """The graph for one output tensor: no stack, layer_range, match or layers node remains.

        For "model.layers.5.mlp.up_proj.weight" and 4-layer models a, b:
        Before: stack(layer_range(a, 0, 3), mul(layer_range(b, 1, 4), layers(0, 1)))
        After:  mul(load b tensor=model.layers.3.mlp.up_proj.weight, 1)
        (output layer 5 is layer 2 of the second part: layer 3 of b, at t = 2/2.)
        """
        index = layer_index(tensor)
        memo: dict[tuple, Node] = {}

        def go(node: Node, layer: int | None, local: int | None, count: int | None) -> Node:
            key = (node, layer, local, count)
            if key in memo:
                return memo[key]
            if node.op == "stack":
                if layer is None:
                    out = go(node.args[0] if is_pre(tensor) else node.args[-1], None, None, None)
                else:
                    offset = 0
                    for part in node.args:
                        n = self.depth(part)
                        if layer < offset + n:
                            out = go(part, layer - offset, layer - offset, n)
                            break
                        offset += n
            elif node.op == "layer_range":
                out = go(node.args[0], None if layer is None else layer + node.attr("start"), local, count)
            elif node.op == "load":
                source = tensor if layer is None else with_layer(tensor, layer)
                out = node if source == tensor else Node("load", (), {**dict(node.attrs), "tensor": source})
            elif node.op == "match":
                for pattern, branch in zip(node.attr("patterns"), node.args):
                    if pattern is None or matches(pattern, tensor):
                        out = go(branch, layer, local, count)
                        break
                else:
                    raise NoMatchingArm(node, tensor)
            elif node.op == "layers":
                args = [fold(go(a, layer, local, count)) for a in node.args]
                if any(a.op != "const" for a in args):
                    raise NotANumber(node)
                t = 0.0 if local is None else (local / (count - 1) if count > 1 else 1.0)
                out = const(interpolate([a.attr("value") for a in args], t))
            else:
                args = tuple(go(a, layer, local, count) for a in node.args)
                out = node if args == node.args else Node(node.op, args, dict(node.attrs))
            if self.spans is not None:
                self.spans.carry(node, out)
            memo[key] = out
            return out

        n = self.num_layers
        return go(self.root, index, index, n)


def prepare(root: Node, checkpoints: dict, spans: Spans | None) -> Stacking:
    """The Stacking of a graph that has `stack` or `layer_range`; raises StackError for a layer count
    out of range, parts that disagree, or a whole-model statistic (its tensors would be renamed)."""
    layers = {key: LayerInfo.from_model(list(c.tensors), c.config).num_layers for key, c in checkpoints.items()}
    stacking = Stacking(root, layers, spans)
    stacking.depth(root)
    for n in walk(root):
        if n.op in OPS and OPS[n.op].kind == "model":
            raise StackError(TYPE, n, f"`{n.op}` is a statistic over every tensor of a model; it cannot be "
                                      "used in a formula with `layer_range` or `stack`",
                             help="merge whole models in one run, then stack the result in another")
        if n.op != "stack":
            continue
        models = stacking.part_models(n)
        first = checkpoints[models[0]]
        for key in models[1:]:
            for name, info in first.tensors.items():
                other = checkpoints[key].tensors.get(name)
                if layer_index(name) is None and other is not None and other.shape != info.shape:
                    raise StackError(SHAPE, n, f"the parts of `stack` have different shapes outside the layer "
                                               f"stack: `{name}` is {list(info.shape)} in `{models[0]}` and "
                                               f"{list(other.shape)} in `{key}`",
                                     help="stack layers of models of one architecture and size")
    return stacking


def output_tensors(stacking: Stacking, checkpoints: dict, reference: str) -> list[tuple[str, str]]:
    """(name, dtype) of every output tensor: the reference's tensors outside the layer stack (those
    before it first), then for each output layer the tensors of the source layer it is built from."""
    by_layer: dict[str, dict[int, list[str]]] = {}
    for key, ckpt in checkpoints.items():
        groups = by_layer.setdefault(key, {})
        for name in ckpt.tensors:
            i = layer_index(name)
            if i is not None:
                groups.setdefault(i, []).append(name)
    ref = checkpoints[reference]
    outside = [name for name in ref.tensors if layer_index(name) is None]
    pre = [(n, ref.tensors[n].dtype) for n in outside if is_pre(n)]
    post = [(n, ref.tensors[n].dtype) for n in outside if not is_pre(n)]
    layers = []
    for k in range(stacking.num_layers):
        model, i = stacking.source_of(k)
        tensors = checkpoints[model].tensors
        layers += [(with_layer(name, k), tensors[name].dtype) for name in by_layer[model].get(i, [])]
    return pre + layers + post


def config_updates(stacking: Stacking, checkpoints: dict, config_source: str) -> dict:
    """The output's layer count, under the key the written config (`config_source`'s: the `config=`
    model, else the reference) uses (num_hidden_layers by default), and its per-layer `layer_types`
    list (Qwen2, Gemma, ...) taken from each source layer."""
    config = checkpoints[config_source].config or {}
    key = next((k for k in ("num_hidden_layers", "n_layer", "num_layers") if k in config), "num_hidden_layers")
    updates = {key: stacking.num_layers}
    if isinstance(config.get("layer_types"), list):
        types = []
        for k in range(stacking.num_layers):
            model, i = stacking.source_of(k)
            source = (checkpoints[model].config or {}).get("layer_types")
            types.append(source[i] if isinstance(source, list) and i < len(source) else config["layer_types"][0])
        updates["layer_types"] = types
    return updates
