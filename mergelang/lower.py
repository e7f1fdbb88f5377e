"""AST → graph: bind names, inline `def`s, broadcast lists, type- and arity-check calls.

The result is one generic graph for "the output tensor with this name": `load` nodes stand for
"this tensor in that model", and per-tensor values (`match tensor`, `layers`) stay symbolic until
`specialize` resolves them for each tensor name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import ast
from .diagnostics import (
    ARITHMETIC, ARITY, INPUT, KEYWORD, LIST_LENGTH, OUTPUT_COUNT, RANGE, RECURSION, REDEFINED, TYPE, UNKNOWN_NAME,
    Diagnostic, MergelangError, Reporter, suggest,
)
from .graph import Node, Spans, const, walk, with_random_key
from .ops import OPS, REQUIRED, OpDef
from .optimize import FoldError, fold
from .output_options import OutputOptions, lower_options
from .parse import parse_file, parse_files
from .resources import stdlib_files

BUILTINS = {"model", "layers", "lora", "layer_range", "stack"}
_BINOPS = {"+": "add", "-": "sub", "*": "mul", "/": "div"}


@dataclass(frozen=True)
class InputModel:
    key: str  # the name the graph's `load` nodes use: the bound name, or the path as written
    path_text: str
    folder: Path
    span: ast.Span
    revision: str | None = None  # model("owner/name", revision=...): a branch, tag or commit in the hub cache
    kind: str = "model"  # or "lora": an adapter folder read as a delta over the model `base_key`
    base_key: str | None = None


@dataclass
class Lowered:
    """A checked program: the output graph, its inputs and the source positions of its nodes."""

    output: Node
    inputs: dict[str, InputModel]  # in order of first use
    spans: Spans
    sources: dict[str, ast.Source]
    output_span: ast.Span
    options: OutputOptions = field(default_factory=OutputOptions)

    def reference_model(self) -> InputModel:
        used = {n.attr("model") for n in walk(self.output) if n.op == "load"}
        for key, model in self.inputs.items():
            if key in used:
                # A LoRA delta has its base's tensors, config and tokenizer.
                return self.inputs[model.base_key] if model.kind == "lora" else model
        return next(iter(self.inputs.values()))


class _Poison:
    """The value of an expression that already produced an error: suppresses follow-on errors."""


POISON = _Poison()


@dataclass(frozen=True)
class _ListV:
    items: tuple[Any, ...]


@dataclass
class _Scope:
    values: dict[str, Any]
    parent: "_Scope | None" = None

    def lookup(self, name: str) -> Any:
        scope = self
        while scope is not None:
            if name in scope.values:
                return scope.values[name]
            scope = scope.parent
        raise KeyError(name)


@dataclass
class _Lowerer:
    reporter: Reporter
    spans: Spans = field(default_factory=Spans)
    inputs: dict[str, InputModel] = field(default_factory=dict)
    defs: dict[str, ast.Def] = field(default_factory=dict)
    call_stack: list[tuple[str, ast.Span]] = field(default_factory=list)  # (def name, call site)
    user_file: str = ""  # diagnostics inside an inlined stdlib def are reported at the user's call
    defining: str | None = None  # the name whose `NAME = ...` is being lowered
    folder: Path = Path(".")
    pending_names: dict[str, int] = field(default_factory=dict)  # assigned later in the file
    globals: _Scope = field(default_factory=lambda: _Scope({}))

    # ---- values -------------------------------------------------------------------------------

    def is_tensor(self, node: Node) -> bool:
        return any(n.op == "load" for n in walk(node))

    def describe(self, v: Any) -> str:
        if isinstance(v, Node):
            return "a tensor" if self.is_tensor(v) else "a number"
        if isinstance(v, bool):
            return "a boolean"
        if isinstance(v, str):
            return "a string"
        if isinstance(v, _ListV):
            return f"a list of {len(v.items)}"
        if isinstance(v, ast.Def):
            return "a function"
        return "a value"

    def user_site(self, span: ast.Span) -> tuple[ast.Span, str | None, str | None]:
        """Where the user should look for `span`: itself in the spec, or for a place inside an inlined
        stdlib def, the innermost call in the spec — with a note and the def's name."""
        if span is not None and span.file != self.user_file:
            sites = [(name, site) for name, site in self.call_stack if site.file == self.user_file]
            if sites:
                name, site = sites[-1]
                return site, f"inside `{name}`, at {span}", name
        return span, None, None

    def at(self, node: Node, span: ast.Span) -> Node:
        """Record where node came from, as the user should see it (see user_site)."""
        return self.spans.add(node, self.user_site(span)[0])

    def error(self, code: str, message: str, span: ast.Span, **kw) -> _Poison:
        site, note, name = self.user_site(span)
        if note:
            kw["notes"] = (note,) + tuple(kw.get("notes", ()))
            kw["label"] = f"in this call of `{name}`"
        self.reporter.error(code, message, site, **kw)
        return POISON

    # ---- expressions --------------------------------------------------------------------------

    def expr(self, e: ast.Node, scope: _Scope, bind_as: str | None = None) -> Any:
        if isinstance(e, ast.Number):
            return self.at(const(e.value), e.span)
        if isinstance(e, ast.String):
            return e.value
        if isinstance(e, ast.Bool):
            return e.value
        if isinstance(e, ast.Name):
            return self.name(e, scope)
        if isinstance(e, ast.List):
            return _ListV(tuple(self.expr(x, scope) for x in e.items))
        if isinstance(e, ast.Neg):
            return self.arith("neg", [self.expr(e.operand, scope)], [e.operand.span], e.span)
        if isinstance(e, ast.BinOp):
            values = [self.expr(e.left, scope), self.expr(e.right, scope)]
            return self.arith(_BINOPS[e.op], values, [e.left.span, e.right.span], e.span)
        if isinstance(e, ast.Call):
            return self.call(e, scope, bind_as)
        if isinstance(e, ast.Match):
            return self.match(e, scope)
        raise TypeError(f"unexpected AST node {e!r}")

    def name(self, e: ast.Name, scope: _Scope) -> Any:
        try:
            return scope.lookup(e.id)
        except KeyError:
            pass
        if e.id in self.defs or e.id in OPS or e.id in BUILTINS:
            return self.error(TYPE, f"`{e.id}` is a function; call it with arguments", e.span,
                              label="not a value", help=f"write `{e.id}(...)`")
        if e.id == self.defining:
            return self.error(UNKNOWN_NAME, f"`{e.id}` is used in its own definition", e.span, label="used here",
                              help="a name can only refer to names defined above it")
        if e.id in self.pending_names:
            return self.error(UNKNOWN_NAME, f"`{e.id}` is used before it is defined", e.span,
                              label="used here", notes=(f"`{e.id}` is defined on line {self.pending_names[e.id]}",),
                              help="move the definition above its first use")
        known = set(self.defs) | set(OPS) | BUILTINS
        s = scope
        while s is not None:
            known |= set(s.values)
            s = s.parent
        return self.error(UNKNOWN_NAME, f"unknown name `{e.id}`", e.span, label="not defined",
                          help=suggest(e.id, known) or "define it with `NAME = ...` before this line")

    def arith(self, opname: str, values: list, spans: list[ast.Span], span: ast.Span) -> Any:
        symbol = {"add": "+", "sub": "-", "mul": "*", "div": "/", "neg": "unary -"}[opname]
        for v, s in zip(values, spans):
            if v is POISON:
                return POISON
            if not isinstance(v, (Node, _ListV)) or isinstance(v, bool):
                return self.error(TYPE, f"`{symbol}` needs numbers, tensors or lists of them, found {self.describe(v)}",
                                  s, label=f"this is {self.describe(v)}")
        lists = [v for v in values if isinstance(v, _ListV)]
        if lists:
            n = len(lists[0].items)
            for v, s in zip(values, spans):
                if isinstance(v, _ListV) and len(v.items) != n:
                    return self.error(LIST_LENGTH, f"lists of different lengths in `{symbol}`: {n} and {len(v.items)}",
                                      s, label=f"a list of {len(v.items)}",
                                      help="elementwise list arithmetic pairs items one to one")
            rows = [v.items if isinstance(v, _ListV) else (v,) * n for v in values]
            return _ListV(tuple(self.arith(opname, list(args), spans, span) for args in zip(*rows)))
        if opname == "div" and values[1].op == "const" and values[1].attr("value") == 0:
            return self.error(ARITHMETIC, "division by zero", span, label="divides by 0")
        return self.at(Node(opname, values), span)

    def match(self, e: ast.Match, scope: _Scope) -> Any:
        patterns, values = [], []
        for i, arm in enumerate(e.arms):
            value = self.expr(arm.value, scope)
            if value is POISON:
                return POISON
            if arm.pattern is None and i != len(e.arms) - 1:
                self.reporter.warn(TYPE, "arms after `_` are never used", e.arms[i + 1].span, label="unreachable")
            patterns.append(None if arm.pattern is None else arm.pattern.value)
            values.append((value, arm.value.span))
        if not values:
            return self.error(ARITY, "`match tensor` needs at least one arm", e.span)
        lists = [v for v, _ in values if isinstance(v, _ListV)]
        if lists:
            n = len(lists[0].items)
            for v, s in values:
                if not isinstance(v, _ListV) or len(v.items) != n:
                    return self.error(LIST_LENGTH, f"every arm must be a list of {n} when one is, found {self.describe(v)}",
                                      s)
            return _ListV(tuple(self.match_node(patterns, [(v.items[i], s) for v, s in values], e.span)
                                for i in range(n)))
        return self.match_node(patterns, values, e.span)

    def match_node(self, patterns: list, values: list, span: ast.Span) -> Any:
        for v, s in values:
            if not isinstance(v, Node):
                return self.error(TYPE, f"a match arm must be a number or a tensor, found {self.describe(v)}", s)
        return self.at(Node("match", [v for v, _ in values], {"patterns": tuple(patterns)}), span)

    # ---- calls --------------------------------------------------------------------------------

    def call(self, e: ast.Call, scope: _Scope, bind_as: str | None) -> Any:
        fname = e.func.id
        local = None
        try:
            local = scope.lookup(fname)
        except KeyError:
            pass
        if local is not None and not isinstance(local, ast.Def):
            return self.error(TYPE, f"`{fname}` is {self.describe(local)}, not a function", e.func.span)
        args = [self.expr(a, scope) for a in e.args]
        kwargs = {k.name: (self.expr(k.value, scope), k) for k in e.kwargs}
        if any(a is POISON for a in args) or any(v is POISON for v, _ in kwargs.values()):
            return POISON
        if fname in ("layer_range", "stack"):
            return self.layer_range(e, args, kwargs) if fname == "layer_range" else self.stack(e, args, kwargs)
        if fname == "model":
            return self.model(e, args, kwargs, bind_as)
        if fname == "layers":
            return self.layers(e, args, kwargs)
        if fname == "lora":
            return self.lora(e, args, kwargs, bind_as)
        if fname in self.defs:
            return self.call_def(self.defs[fname], e, args, kwargs)
        if fname in OPS:
            return self.call_op(OPS[fname], e, args, kwargs)
        callables = set(self.defs) | set(OPS) | BUILTINS
        return self.error(UNKNOWN_NAME, f"unknown function `{fname}`", e.func.span, label="not defined",
                          help=suggest(fname, callables) or "define it with `def NAME(params) = ...`")

    def model(self, e: ast.Call, args, kwargs, bind_as: str | None) -> Any:
        revision, k = kwargs.pop("revision", (None, None))
        if kwargs:
            k = next(iter(kwargs.values()))[1]
            return self.error(KEYWORD, f"`model` takes no keyword `{k.name}`", k.span,
                              help='write `model("PATH")` or `model("owner/name", revision="REV")`')
        if revision is not None and not isinstance(revision, str):
            return self.error(TYPE, f"`revision` of `model` must be a string (a branch, tag or commit), "
                                    f"found {self.describe(revision)}", k.value.span)
        if len(args) != 1 or not isinstance(args[0], str):
            found = f"{len(args)} arguments" if len(args) != 1 else self.describe(args[0])
            return self.error(ARITY if len(args) != 1 else TYPE,
                              f"`model` takes one string, the checkpoint folder; found {found}", e.span,
                              help='write `model("path/to/checkpoint")` (relative to the spec\'s folder)')
        path_text = args[0]
        key = bind_as or (path_text if revision is None else f"{path_text}@{revision}")
        if key in self.inputs and self.inputs[key].kind != "model":  # `lora("x", ...)` came first
            key = f"model({path_text!r})"
        if key not in self.inputs:
            self.inputs[key] = InputModel(key, path_text, (self.folder / path_text), e.span, revision)
        return self.at(Node("load", (), {"model": key}), e.span)

    def lora(self, e: ast.Call, args, kwargs, bind_as: str | None) -> Any:
        usage = 'write `lora("path/to/adapter", base=MODEL)` with MODEL a name bound to `model(...)`'
        for name, (_, k) in kwargs.items():
            if name != "base":
                return self.error(KEYWORD, f"`lora` has no parameter `{name}`", k.span,
                                  help=suggest(name, ["base"]) or usage)
        if not args or not isinstance(args[0], str) or len(args) + len(kwargs) > 2:
            found = f"{len(args) + len(kwargs)} arguments" if len(args) + len(kwargs) > 2 or not args \
                else self.describe(args[0])
            return self.error(ARITY if len(args) + len(kwargs) > 2 or not args else TYPE,
                              f"`lora` takes the adapter folder as a string and `base=`; found {found}",
                              e.span, help=usage)
        if len(args) == 2 and "base" in kwargs:
            return self.error(KEYWORD, "`base` is given twice", kwargs["base"][1].span, help=usage)
        if len(args) == 2:
            base, base_span = args[1], e.args[1].span
        elif "base" in kwargs:
            base, base_span = kwargs["base"][0], kwargs["base"][1].value.span
        else:
            return self.error(ARITY, "`lora` needs `base=`, the model the adapter was trained on", e.span,
                              help=usage)
        base_input = self.inputs.get(base.attr("model")) if isinstance(base, Node) and base.op == "load" else None
        if base_input is None or base_input.kind != "model":
            found = "a LoRA delta" if base_input is not None else self.describe(base)
            return self.error(TYPE, f"`base` of `lora` must be a model, found {found}", base_span,
                              label="not a model", help=usage)
        path_text = args[0]
        key = bind_as or path_text
        known = self.inputs.get(key)
        if known is not None and (known.kind, known.base_key) != ("lora", base_input.key):
            key = f"{path_text}@{base_input.key}"
        if key not in self.inputs:
            self.inputs[key] = InputModel(key, path_text, self.folder / path_text, e.span,
                                          kind="lora", base_key=base_input.key)
        return self.at(Node("load", (), {"model": key}), e.span)

    def layers(self, e: ast.Call, args, kwargs) -> Any:
        if kwargs:
            k = next(iter(kwargs.values()))[1]
            return self.error(KEYWORD, f"`layers` takes no keyword `{k.name}`", k.span)
        if not args:
            return self.error(ARITY, "`layers` needs at least one value", e.span,
                              help="write `layers(v0, v1, ..., vn)`: values at the first and last layer and between")
        for a, s in zip(args, e.args):
            if not isinstance(a, Node) or self.is_tensor(a):
                return self.error(TYPE, f"`layers` values must be numbers, found {self.describe(a)}", s.span)
        return self.at(Node("layers", args), e.span)

    def layer_range(self, e: ast.Call, args, kwargs) -> Any:
        """`layer_range(X, START, END)`: X's layers START..END-1, renumbered from 0 (see stacking.py)."""
        usage = "write `layer_range(X, START, END)`: the layers START..END-1 of X, numbered from 0"
        if kwargs:
            k = next(iter(kwargs.values()))[1]
            return self.error(KEYWORD, f"`layer_range` takes no keyword `{k.name}`", k.span, help=usage)
        if len(args) != 3:
            return self.error(ARITY, f"`layer_range` takes 3 arguments (X, START, END), found {len(args)}", e.span,
                              help=usage)
        bounds = []
        for what, v, s in (("START", args[1], e.args[1]), ("END", args[2], e.args[2])):
            if isinstance(v, Node) and not self.is_tensor(v):
                try:
                    v = fold(v)
                except FoldError as err:
                    return self.error(ARITHMETIC, err.message, s.span)
            value = v.attr("value") if isinstance(v, Node) and v.op == "const" else None
            if value is None:
                found = "a per-tensor number" if isinstance(v, Node) and not self.is_tensor(v) else self.describe(v)
                return self.error(TYPE, f"{what} of `layer_range` must be a whole number, found {found}",
                                  s.span, help=usage)
            if not float(value).is_integer():
                return self.error(TYPE, f"{what} of `layer_range` must be a whole number, found {value:g}", s.span)
            if value < 0:
                return self.error(RANGE, f"{what} of `layer_range` must be >= 0, got {value:g}", s.span)
            bounds.append(int(value))
        start, end = bounds
        if start >= end:
            return self.error(RANGE, f"`layer_range` needs START < END, got START={start} and END={end}", e.span,
                              label="empty range", help="END is exclusive: `layer_range(x, 0, 8)` is layers 0..7")
        values = args[0].items if isinstance(args[0], _ListV) else (args[0],)
        spans = e.args[0].items if isinstance(e.args[0], ast.List) else [e.args[0]] * len(values)
        out = []
        for v, s in zip(values, spans):
            if not isinstance(v, Node) or not self.is_tensor(v):
                return self.error(TYPE, f"`layer_range` needs a tensor (a model or an expression of models), "
                                        f"found {self.describe(v)}", s.span)
            node = Node("layer_range", (v,), {"start": start, "end": end})
            self.spans.add_arg(node, 2, *self.user_site(e.args[2].span)[:2])  # END, for "beyond the layers"
            out.append(self.at(node, e.span))
        return _ListV(tuple(out)) if isinstance(args[0], _ListV) else out[0]

    def stack(self, e: ast.Call, args, kwargs) -> Any:
        """`stack(PART, ...)`: the parts' layers one after the other (see stacking.py)."""
        if kwargs:
            k = next(iter(kwargs.values()))[1]
            return self.error(KEYWORD, f"`stack` takes no keyword `{k.name}`", k.span)
        parts = list(zip(args, e.args))
        if len(args) == 1 and isinstance(args[0], _ListV):
            items = e.args[0].items if isinstance(e.args[0], ast.List) else [e.args[0]] * len(args[0].items)
            parts = list(zip(args[0].items, items))
        if not parts:
            return self.error(ARITY, "`stack` needs at least one part", e.span,
                              help="write `stack(layer_range(a, 0, 24), layer_range(b, 20, 40))`")
        for v, s in parts:
            if not isinstance(v, Node) or not self.is_tensor(v):
                return self.error(TYPE, f"each part of `stack` must be a tensor (a model or an expression of "
                                        f"models), found {self.describe(v)}", s.span)
        return self.at(Node("stack", [v for v, _ in parts]), e.span)

    def call_def(self, d: ast.Def, e: ast.Call, args, kwargs) -> Any:
        names = [p.name for p in d.params]
        if len(args) > len(names):
            return self.error(ARITY, f"`{d.name.id}` takes at most {len(names)} arguments, found {len(args)}",
                              e.args[len(names)].span, label="extra argument",
                              notes=(f"`{d.name.id}` is defined at {d.span}",))
        bound = dict(zip(names, args))
        for k, (v, kw) in kwargs.items():
            if k not in names:
                return self.error(KEYWORD, f"`{d.name.id}` has no parameter `{k}`", kw.span,
                                  help=suggest(k, names) or f"its parameters are: {', '.join(names)}")
            if k in bound:
                return self.error(KEYWORD, f"`{k}` is given twice", kw.span)
            bound[k] = v
        if d.name.id in [name for name, _ in self.call_stack]:
            return self.error(RECURSION, f"`{d.name.id}` calls itself", e.span,
                              notes=(" → ".join([name for name, _ in self.call_stack] + [d.name.id]),),
                              help="merge formulas are expanded inline, so functions cannot recurse")
        self.call_stack.append((d.name.id, e.span))
        try:
            for p in d.params:
                if p.name not in bound:
                    if p.default is None:
                        return self.error(ARITY, f"`{d.name.id}` needs argument `{p.name}`", e.span,
                                          notes=(f"`{d.name.id}` is defined at {d.span}",))
                    bound[p.name] = self.expr(p.default, self.globals)
            value = self.expr(d.body, _Scope(bound, self.globals))
        finally:
            self.call_stack.pop()
        if isinstance(value, Node):
            self.at(value, e.span)
        return value

    def call_op(self, spec: OpDef, e: ast.Call, args, kwargs) -> Any:
        # Positional arguments fill the inputs, then the parameters in order.
        if spec.inputs is None:
            inputs = list(zip(args, (a.span for a in e.args)))
            if len(args) == 1 and isinstance(args[0], _ListV):
                items_ast = e.args[0].items if isinstance(e.args[0], ast.List) else [e.args[0]] * len(args[0].items)
                inputs = list(zip(args[0].items, (a.span for a in items_ast)))
            if not inputs:
                return self.error(ARITY, f"`{spec.name}` needs at least one value", e.span, help=_signature(spec))
            for v, s in inputs:
                if not isinstance(v, Node):
                    return self.error(TYPE, f"`{spec.name}` takes numbers or tensors (or one list of them), "
                                            f"found {self.describe(v)}", s)
            positional_params, extra = [], []
        else:
            if len(args) < spec.inputs:
                return self.error(ARITY, f"`{spec.name}` needs {spec.inputs} input{'s' * (spec.inputs > 1)}, "
                                         f"found {len(args)}", e.span, help=_signature(spec))
            inputs = list(zip(args[: spec.inputs], (a.span for a in e.args)))
            positional_params, extra = args[spec.inputs:], e.args[spec.inputs:]
            if len(positional_params) > len(spec.params):
                return self.error(ARITY, f"`{spec.name}` takes at most {spec.inputs + len(spec.params)} arguments, "
                                         f"found {len(args)}", e.args[spec.inputs + len(spec.params)].span,
                                  label="extra argument", help=_signature(spec))
        params: dict[str, tuple[Any, ast.Span]] = {
            p.name: (v, a.span) for p, v, a in zip(spec.params, positional_params, extra)
        }
        for k, (v, kw) in kwargs.items():
            if spec.param(k) is None:
                names = [p.name for p in spec.params]
                unset = [p.name for p in spec.params[len(positional_params):]
                         if p.default is REQUIRED and p.name not in kwargs]
                guess = suggest(k, names) or (f"did you mean `{unset[0]}`?" if len(unset) == 1 else None)
                return self.error(KEYWORD, f"`{spec.name}` has no parameter `{k}`", kw.span,
                                  help=guess or (f"its parameters are: {', '.join(names)}" if names
                                                 else f"`{spec.name}` takes no parameters"))
            if k in params:
                return self.error(KEYWORD, f"`{k}` is given twice", kw.span)
            params[k] = (v, kw.value.span)
        values: list[tuple[Any, ast.Span]] = []
        for p in spec.params:
            if p.name in params:
                values.append(params[p.name])
            elif p.default is REQUIRED:
                return self.error(ARITY, f"`{spec.name}` needs parameter `{p.name}`", e.span,
                                  help=_signature(spec))
            else:
                values.append((p.default, e.span))
        return self.apply_op(spec, inputs, values, e.span)

    def apply_op(self, spec: OpDef, inputs, params, span) -> Any:
        """Build the op node. Lists among fixed-arity inputs and (not per-input) parameters
        broadcast pairwise: `dare([a, b], p=[0.9, 0.8])` is `[dare(a, p=0.9), dare(b, p=0.8)]`."""
        scalar_params = [(v, s) for p, (v, s) in zip(spec.params, params) if p.kind != "per_input"]
        lists = [(v, s) for v, s in (inputs if spec.inputs is not None else []) + scalar_params
                 if isinstance(v, _ListV)]
        if lists:
            n = len(lists[0][0].items)
            for v, s in lists:
                if len(v.items) != n:
                    return self.error(LIST_LENGTH, f"`{spec.name}` got lists of different lengths: {n} and "
                                                   f"{len(v.items)}", s)

            def pick(p, v, i):
                return v.items[i] if isinstance(v, _ListV) and (p is None or p.kind != "per_input") else v

            return _ListV(tuple(
                self.apply_op(spec, [(pick(None, v, i), s) for v, s in inputs] if spec.inputs is not None else inputs,
                              [(pick(p, v, i), s) for p, (v, s) in zip(spec.params, params)], span)
                for i in range(n)))
        for v, s in inputs:
            if not isinstance(v, Node):
                return self.error(TYPE, f"`{spec.name}` takes numbers or tensors, found {self.describe(v)}", s)
            if spec.tensor_inputs and not self.is_tensor(v):
                return self.error(TYPE, f"`{spec.name}` needs a tensor, found a number", s,
                                  help="apply it to an expression that involves a model")
        args, arg_spans = [v for v, _ in inputs], []
        for p, (v, s) in zip(spec.params, params):
            values = self.per_input(spec, p, v, s, len(inputs)) if p.kind == "per_input" else [v]
            if values is POISON:
                return POISON
            for value in values:
                node = self.param_node(spec, p, value, s)
                if node is POISON:
                    return POISON
                args.append(node)
                arg_spans.append(s)
        node = Node(spec.name, args)
        if spec.random:
            node = with_random_key(node)
        for i, s in enumerate(arg_spans):
            site, note, _ = self.user_site(s)
            self.spans.add_arg(node, len(inputs) + i, site, note)
        return self.at(node, span)

    def per_input(self, spec: OpDef, p, v, s, n: int) -> Any:
        if not isinstance(v, _ListV):
            return [v] * n
        if len(v.items) != n:
            return self.error(LIST_LENGTH, f"`{p.name}` of `{spec.name}` needs one value per input: {n}, "
                                           f"found a list of {len(v.items)}", s)
        return list(v.items)

    def param_node(self, spec: OpDef, p, v, s) -> Any:
        what = f"`{p.name}` of `{spec.name}`"
        if p.kind == "bool":
            if not isinstance(v, bool):
                return self.error(TYPE, f"{what} must be true or false, found {self.describe(v)}", s)
            return const(p.encode(v))
        if p.kind == "choice":
            if v not in p.choices:
                options = ", ".join(f'"{c}"' for c in p.choices)
                found = f'"{v}"' if isinstance(v, str) else self.describe(v)
                return self.error(TYPE, f"{what} must be one of {options}, found {found}", s)
            return const(p.encode(v))
        if isinstance(v, bool) or not isinstance(v, Node) and not isinstance(v, (int, float)):
            return self.error(TYPE, f"{what} must be a number, found {self.describe(v)}", s)
        node = v if isinstance(v, Node) else const(v)
        if self.is_tensor(node):
            return self.error(TYPE, f"{what} must be a number, found a tensor", s,
                              help="parameters are numbers, or per-tensor numbers from `layers(...)` or `match tensor`")
        return node


def _signature(spec: OpDef) -> str:
    ins = "x1, x2, ..." if spec.inputs is None else ", ".join(f"x{i}" if spec.inputs > 1 else "x"
                                                                for i in range(1, spec.inputs + 1))
    params = [p.name if p.default is REQUIRED else f"{p.name}={p.default!r}" for p in spec.params]
    return f"usage: {spec.name}(" + ", ".join([ins] + params) + ")"


def _collect_defs(program: ast.Program, reporter: Reporter, *, stdlib: bool) -> dict[str, ast.Def]:
    defs: dict[str, ast.Def] = {}
    for st in program.statements:
        if isinstance(st, ast.Def):
            name = st.name.id
            if name in OPS or name in BUILTINS:
                reporter.error(REDEFINED, f"`{name}` is a built-in primitive and cannot be redefined",
                               st.name.span, help="choose another name")
            elif name in defs:
                reporter.error(REDEFINED, f"`{name}` is defined twice", st.name.span,
                               notes=(f"first defined at {defs[name].span}",))
            else:
                defs[name] = st
        elif stdlib:
            reporter.error(TYPE, "the standard library may only contain `def`s", st.span)
    return defs


def load_stdlib(reporter: Reporter) -> tuple[dict[str, ast.Def], dict[str, ast.Source]]:
    defs, sources = {}, {}
    for program in parse_files(stdlib_files()):
        sources[program.source.name] = program.source
        defs.update(_collect_defs(program, reporter, stdlib=True))
    return defs, sources


def lower(program: ast.Program, reporter: Reporter | None = None) -> Lowered:
    """Check and lower a parsed program. Raises MergelangError listing every error found."""
    reporter = reporter or Reporter()
    stdlib_defs, sources = load_stdlib(reporter)
    sources[program.source.name] = program.source
    lowerer = _Lowerer(reporter, folder=program.source.folder, user_file=program.source.name)
    # A user's def may shadow a stdlib method of the same name.
    lowerer.defs = {**stdlib_defs, **_collect_defs(program, reporter, stdlib=False)}

    outputs = [st for st in program.statements if isinstance(st, ast.Output)]
    assigns = [st for st in program.statements if isinstance(st, ast.Assign)]
    lowerer.pending_names = {st.name.id: st.span.line for st in assigns}
    globals_ = lowerer.globals
    output_value: Any = POISON
    options = OutputOptions()
    for st in program.statements:
        if isinstance(st, ast.Assign):
            name = st.name.id
            lowerer.pending_names.pop(name, None)
            if name in globals_.values:
                reporter.error(REDEFINED, f"`{name}` is assigned twice", st.name.span,
                               help="each name is bound once; choose a new name")
                continue
            if name in OPS or name in BUILTINS or name in lowerer.defs:
                reporter.error(REDEFINED, f"`{name}` is the name of a function", st.name.span,
                               help="choose another name")
                continue
            lowerer.defining = name
            value = lowerer.expr(st.value, globals_, bind_as=name)
            lowerer.defining = None
            globals_.values[name] = value
        elif isinstance(st, ast.Output):
            if st is outputs[0]:
                output_value = lowerer.expr(st.value, globals_)
                options = lower_options(lowerer, st.options, globals_)
    if not outputs:
        end = program.source.text.count("\n") or 1
        reporter.error(OUTPUT_COUNT, "the spec has no `output` statement",
                       ast.Span(program.source.name, end, 1, end, 1),
                       help="add a line `output EXPR` naming the merged model")
    for extra in outputs[1:]:
        reporter.error(OUTPUT_COUNT, "a spec has exactly one `output`", extra.span, label="second output",
                       notes=(f"the first is at {outputs[0].span}",))
    if output_value is not POISON and outputs:
        if isinstance(output_value, _ListV):
            reporter.error(TYPE, f"the output must be one tensor, found {lowerer.describe(output_value)}",
                           outputs[0].value.span, help="combine the list, e.g. with avg(...) or sum(...)")
        elif not isinstance(output_value, Node) or not lowerer.is_tensor(output_value):
            reporter.error(TYPE, f"the output must be a tensor, found {lowerer.describe(output_value)}",
                           outputs[0].value.span, help="the output must involve at least one `model(...)`")
    reporter.raise_if_errors()
    return Lowered(output_value, lowerer.inputs, lowerer.spans, sources, outputs[0].span, options)


def lower_file(path: Path, reporter: Reporter | None = None) -> Lowered:
    try:
        program = parse_file(path)
    except FileNotFoundError:
        raise MergelangError(Diagnostic(INPUT, f"spec file not found: {path}", help="check the path")) from None
    return lower(program, reporter)
