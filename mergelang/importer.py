"""`mergelang import`: a mergekit YAML config → an equivalent, readable mergelang spec.

mergekit resolves a parameter for each input model and tensor by looking, in order, at the model's
own `parameters`, the slice's, and the top-level ones; in each place a value is a number, a gradient
(a list, interpolated over the layers), or a list of `filter`/`value` entries where the first entry
whose filter occurs in the tensor name wins (an entry without a filter matches every tensor) and,
when none matches, the next place is consulted. The translation keeps that order exactly:

    per-model weight [1, 0.5] with filters  →  weights=[layers(1, 0.5), match tensor { "mlp" => 0.5, _ => 0 }]

Methods are the stdlib defs of the same names; per-model parameters become lists in model order.
`slices` become `stack(layer_range(...), ...)`; `dtype`/`out_dtype`, `tokenizer_source` and
`chat_template` become output options. A multi-document config (mergekit-multi) becomes one spec
whose intermediate merges are names. Anything without an equivalent is a diagnostic pointing at
its key in the YAML file.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from .ast import Span
from .diagnostics import (INPUT, OUTPUT_PATH, SYNTAX, TYPE, UNKNOWN_NAME, UNSUPPORTED, Diagnostic, MergelangError,
                          suggest)
from .resources import stdlib_files
from .yaml_nodes import YMap, YScalar, YSeq, load_all, plain

REQUIRED = object()


@dataclass(frozen=True)
class _Method:
    """How a mergekit method maps onto the stdlib def of the same name.

    shape: "base+models" f(base, [models]); "models" f([models]); "pair" f(base, other);
           "one" f(x); "models,base=" f([models], base=BASE) with an optional base.
    base:  "required", "optional" or "ignored" (mergekit's base policy for the method).
    per_model: mergekit's per-model parameters and their defaults, in the order they are written.
    shared: mergekit's other parameters and their defaults (the stdlib def's too); REQUIRED where required.
    """

    shape: str
    base: str
    per_model: dict = field(default_factory=dict)
    shared: dict = field(default_factory=dict)


def _ta(normalize: bool, rescale: bool, **per_model) -> _Method:
    return _Method("base+models", "required", {"weight": REQUIRED, "density": 1.0, **per_model},
                   {"normalize": normalize, "rescale": rescale, "lambda": 1.0, "int8_mask": False})


METHODS: dict[str, _Method] = {
    # mergekit accepts `density` and `rescale` for task_arithmetic and does not use them
    "task_arithmetic": _Method("base+models", "required", {"weight": REQUIRED},
                               {"normalize": False, "lambda": 1.0, "int8_mask": False}),
    "ties": _ta(True, False),
    "dare_ties": _ta(False, True),
    "dare_linear": _ta(False, True),
    "breadcrumbs": _ta(False, False, gamma=0.01),
    "breadcrumbs_ties": _ta(False, False, gamma=0.01),
    "della": _ta(True, True, epsilon=0.15),
    "della_linear": _ta(False, True, epsilon=0.15),
    "linear": _Method("models", "ignored", {"weight": REQUIRED}, {"normalize": True}),
    "slerp": _Method("pair", "required", {}, {"t": REQUIRED}),
    "nearswap": _Method("pair", "required", {}, {"t": REQUIRED}),
    "arcee_fusion": _Method("pair", "required"),
    "passthrough": _Method("one", "ignored", {"scale": 1}),
    "karcher": _Method("models", "ignored", {}, {"max_iter": 10, "tol": 1e-5}),
    "model_stock": _Method("base+models", "required", {}, {"filter_wise": False}),
    "sce": _Method("base+models", "required", {}, {"select_topk": 1.0, "int8_mask": False}),
    "ram": _Method("base+models", "required", {}, {"epsilon": 1e-5}),
    "ramplus_tl": _Method("base+models", "required", {}, {"r": 0.1, "alpha": 0.2, "epsilon": 1e-5}),
    "multislerp": _Method("models,base=", "optional", {"weight": REQUIRED},
                          {"normalize_weights": True, "eps": 1e-8}),
    "nuslerp": _Method("models,base=", "optional", {"weight": REQUIRED},
                       {"nuslerp_flatten": True, "nuslerp_row_wise": False}),
}

# mergekit's parameter name → the stdlib def's keyword.
KEYWORD = {"weight": "weights"}

_DTYPES = {"float16": "fp16", "fp16": "fp16", "half": "fp16", "bfloat16": "bf16", "bf16": "bf16",
           "float32": "fp32", "fp32": "fp32", "float": "fp32", "float64": "fp64", "fp64": "fp64"}
_DTYPE_WORDS = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32", "fp64": "float64"}

_DOC_KEYS = {"name", "models", "slices", "merge_method", "base_model", "dtype", "out_dtype", "parameters",
             "tokenizer_source", "chat_template"}
_WHY_NOT = {
    "modules": "per-module merges (`modules`) have no mergelang equivalent",
    "tokenizer": "the `tokenizer` block (merged vocabularies and token embeddings) has no mergelang equivalent",
    "experts": "mixture-of-experts configs (mergekit-moe) are not merges mergelang expresses",
    "gate_mode": "mixture-of-experts configs (mergekit-moe) are not merges mergelang expresses",
}
_KEYWORDS = {"def", "output", "match", "tensor", "true", "false", "model", "layers", "lora", "stack",
             "layer_range"}
_LINE = 100


# ---- the spec as a small tree, printed on one line when it fits ---------------------------------------


@dataclass
class _Call:
    fn: str
    args: list
    kwargs: list  # (name, value) pairs


@dataclass
class _List:
    items: list


@dataclass
class _Match:
    arms: list  # (pattern or None for `_`, value)


def _flat(x) -> str:
    if isinstance(x, _Call):
        parts = [_flat(a) for a in x.args] + [f"{k}={_flat(v)}" for k, v in x.kwargs]
        return f"{x.fn}({', '.join(parts)})"
    if isinstance(x, _List):
        return "[" + ", ".join(_flat(i) for i in x.items) + "]"
    if isinstance(x, _Match):
        return "match tensor { " + ", ".join(f"{_arm(p)} => {_flat(v)}" for p, v in x.arms) + " }"
    return x


def _arm(pattern: str | None) -> str:
    return "_" if pattern is None else _string(pattern)


def _pretty(x, indent: int, start: int) -> str:
    """x printed from column `start` of a line indented by `indent`: on one line when it fits, else
    one argument (list item, match arm) per line."""
    flat = _flat(x)
    if len(flat) + start <= _LINE or not isinstance(x, (_Call, _List, _Match)):
        return flat
    pad = " " * (indent + 4)
    if isinstance(x, _Call):
        parts = [_pretty(a, indent + 4, indent + 4) for a in x.args]
        parts += [f"{k}=" + _pretty(v, indent + 4, indent + 5 + len(k)) for k, v in x.kwargs]
        opening, closing = f"{x.fn}(", ")"
    elif isinstance(x, _List):
        parts = [_pretty(i, indent + 4, indent + 4) for i in x.items]
        opening, closing = "[", "]"
    else:
        parts = [f"{_arm(p)} => " + _pretty(v, indent + 4, indent + 8 + len(_arm(p))) for p, v in x.arms]
        opening, closing = "match tensor {", "}"
    return opening + "\n" + "".join(pad + p + ",\n" for p in parts) + " " * indent + closing


def _string(text: str) -> str:
    """A mergelang string literal (Python escapes)."""
    out = []
    for ch in text:
        if ch in "\"\\":
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 32 or ord(ch) == 127:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _stdlib_names() -> set[str]:
    names = set()
    for path in stdlib_files():
        names.update(re.findall(r"^def\s+([A-Za-z_][A-Za-z0-9_]*)", path.read_text(encoding="utf-8"), re.M))
    return names


# ---- translation ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Ref:
    path: str
    revision: str | None = None
    lora: str | None = None


@dataclass
class _Input:
    ref: _Ref
    expr: str  # the bound name, or layer_range(name, a, b)
    params: YMap | None
    where: str  # "models[1]" / "slices[0].sources[1]", for messages
    span: Span


class _Translator:
    def __init__(self):
        from .ops import OPS

        self.reserved = set(_KEYWORDS) | set(OPS) | _stdlib_names()
        self.taken = set(self.reserved)
        self.names: dict[_Ref, str] = {}  # declared models
        self.model_lines: list[str] = []
        self.docs: dict[str, str] = {}  # mergekit-multi merge name → bound name
        self.notes: list[str] = []

    # -- diagnostics

    def fail(self, message: str, span: Span | None, help: str | None = None, code: str = UNSUPPORTED):
        raise MergelangError(Diagnostic(code, message, span, help=help))

    # -- names and models

    def fresh(self, text: str) -> str:
        base = re.sub(r"[^a-z0-9_]+", "_", text.lower()).strip("_") or "model"
        base = re.sub(r"_+", "_", base)
        if base[0].isdigit():
            base = "m_" + base
        if base in self.reserved:
            base += "_model"
        name, i = base, 2
        while name in self.taken:
            name, i = f"{base}_{i}", i + 1
        self.taken.add(name)
        return name

    def parse_ref(self, node, where: str) -> _Ref:
        if not isinstance(node, YScalar) or not isinstance(node.value, str) or not node.value.strip():
            self.fail(f"`{where}` must be a model path or hub id written as a string, found {_describe(node)}",
                      node.span, help='write it as `model: org/name`, `org/name@revision` or `org/name+lora-path`')
        text = node.value.strip()
        parts = text.split("+")
        if len(parts) > 2:
            self.fail(f"`{where}`: expected `MODEL` or `MODEL+LORA`, found {text!r}", node.span)
        path, _, revision = parts[0].partition("@")
        if "@" in revision or not path:
            self.fail(f"`{where}`: expected `MODEL@REVISION`, found {text!r}", node.span)
        lora = parts[1] if len(parts) == 2 else None
        if lora is not None and ("@" in lora or not lora):
            self.fail(f"`{where}`: a LoRA adapter is written as a path or hub id without a revision, "
                      f"found {lora!r}", node.span)
        return _Ref(path, revision or None, lora)

    def bind(self, ref: _Ref, span: Span) -> str:
        """The name bound to a model (declared on first use), or to an earlier merge of a multi-document config."""
        if ref.path in self.docs and ref.revision is None:
            if ref.lora is not None:
                self.fail(f"a LoRA on the intermediate merge `{ref.path}` cannot be translated", span)
            return self.docs[ref.path]
        if ref in self.names:
            return self.names[ref]
        if ref.lora is not None:
            base = self.bind(_Ref(ref.path, ref.revision), span)
            name = self.fresh(f"{base}_{ref.lora.rstrip('/').split('/')[-1]}")
            self.model_lines.append(f"{name} = {base} + lora({_string(ref.lora)}, base={base})")
        else:
            name = self.fresh(ref.path.rstrip("/").split("/")[-1])
            revision = f", revision={_string(ref.revision)}" if ref.revision else ""
            self.model_lines.append(f"{name} = model({_string(ref.path)}{revision})")
        self.names[ref] = name
        return name

    # -- parameter values

    def value(self, node, where: str) -> str:
        """A parameter's value: a number, a boolean, or a gradient → layers(...)."""
        if isinstance(node, YSeq):
            items = [self.scalar(item, f"{where}[{i}]", gradient=True) for i, item in enumerate(node.items)]
            if not items:
                self.fail(f"`{where}` is an empty gradient", node.span, help="give at least one value")
            return items[0] if len(items) == 1 else "layers(" + ", ".join(items) + ")"
        return self.scalar(node, where)

    def scalar(self, node, where: str, gradient: bool = False) -> str:
        if not isinstance(node, YScalar):
            self.fail(f"`{where}` must be a number{'' if gradient else ', a boolean or a list of numbers'}, "
                      f"found {_describe(node)}", node.span)
        v = node.value
        if isinstance(v, str):
            try:
                v = float(v)
            except ValueError:
                self.fail(f"`{where}` must be a number or a boolean, found the string {v!r}", node.span,
                          code=TYPE)
        if isinstance(v, bool):
            if gradient:
                self.fail(f"`{where}`: a gradient interpolates numbers; found the boolean {str(v).lower()}",
                          node.span, code=TYPE)
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            if isinstance(v, float) and not math.isfinite(v):
                self.fail(f"`{where}` must be a finite number, found {v}", node.span, code=TYPE)
            text = repr(abs(v))
            return "-" + text if v < 0 else text
        self.fail(f"`{where}` must be a number or a boolean, found {_describe(node)}", node.span, code=TYPE)

    def arms(self, node, where: str) -> tuple[list[tuple[str | None, str]], bool]:
        """A setting as (filter, value) arms, and whether it ends with an entry matching every tensor."""
        entries = None
        if isinstance(node, YMap):
            entries = [(node, where)]
        elif isinstance(node, YSeq) and node.items and all(isinstance(i, YMap) for i in node.items):
            entries = [(item, f"{where}[{i}]") for i, item in enumerate(node.items)]
        elif isinstance(node, YSeq) and any(isinstance(i, YMap) for i in node.items):
            self.fail(f"`{where}` mixes filter entries and plain values", node.span,
                      help="write every entry as `- filter: ...` / `value: ...`, the last one without a filter")
        if entries is None:
            return [(None, self.value(node, where))], True
        arms = []
        for entry, at in entries:
            for key in entry.items:
                if key not in ("filter", "value"):
                    self.fail(f"`{at}.{key}`: a conditional parameter has only `filter` and `value`",
                              entry.keys[key])
            if "value" not in entry:
                self.fail(f"`{at}` has no `value`", entry.span)
            flt = entry.get("filter")
            pattern = None
            if flt is not None and not (isinstance(flt, YScalar) and flt.value is None):
                if not isinstance(flt, YScalar) or not isinstance(flt.value, str):
                    self.fail(f"`{at}.filter` must be a string, found {_describe(flt)}", flt.span, code=TYPE)
                pattern = None if flt.value == "*" else flt.value
                if pattern is not None and "*" in pattern:
                    self.fail(f"`{at}.filter`: mergekit matches {pattern!r} as a plain substring, `*` included; "
                              f"mergelang reads `*` as a wildcard", flt.span)
            value = self.value(entry.items["value"], f"{at}.value")
            arms.append((pattern, value))
            if pattern is None:
                return arms, True
        return arms, False

    def resolve(self, param: str, scopes: list[tuple[YMap | None, str]], default, span: Span, who: str):
        """The value of `param` over scopes in precedence order; None when absent and optional."""
        arms: list[tuple[str | None, str]] = []
        for scope, where in scopes:
            if scope is None or param not in scope:
                continue
            more, complete = self.arms(scope.items[param], f"{where}.{param}")
            arms += more
            if complete:
                break
        else:
            if default is REQUIRED:
                self.fail(f"`{param}` is required for {who}" + (" on tensors that no `filter` matches"
                                                                if arms else ""), span,
                          help=f"add `{param}: VALUE` to the parameters" + (" (a last entry without a filter)"
                                                                            if arms else ""))
            if not arms:
                return None  # the stdlib def's default, which is mergekit's
            arms.append((None, self.scalar(YScalar(default, span), param)))
        if len(arms) == 1:
            return arms[0][1]
        return _Match(arms)

    # -- one merge document

    def document(self, doc: YMap):
        """The merge expression of one config document."""
        for key, key_span in doc.keys.items():
            if key in _WHY_NOT:
                self.fail(f"`{key}` cannot be translated: {_WHY_NOT[key]}", key_span)
            if key not in _DOC_KEYS:
                self.notes.append(f"ignored `{key}` (line {key_span.line}): not a mergekit setting")
        if "merge_method" not in doc:
            self.fail("the config has no `merge_method`", doc.span, help="add e.g. `merge_method: linear`")
        mnode = doc.items["merge_method"]
        method_name = mnode.value if isinstance(mnode, YScalar) else None
        if not isinstance(method_name, str) or method_name not in METHODS:
            hint = suggest(str(method_name), METHODS) if isinstance(method_name, str) else None
            self.fail(f"`merge_method`: mergelang has no method {_describe(mnode)}", mnode.span,
                      help=hint or "mergelang's methods: " + ", ".join(sorted(METHODS)), code=UNKNOWN_NAME)
        method = METHODS[method_name]
        top = self.params_map(doc, "parameters")
        base_ref = self.parse_ref(doc.items["base_model"], "base_model") if "base_model" in doc else None
        if base_ref is not None:
            self.bind(base_ref, doc.items["base_model"].span)
        has_models, has_slices = "models" in doc, "slices" in doc
        if has_models == has_slices:
            self.fail("the config needs exactly one of `models` and `slices`", doc.span)
        if has_models:
            inputs = self.model_list(doc.items["models"], "models")
            return self.merge(method_name, method, inputs, base_ref, doc.items.get("base_model"),
                              [(top, "parameters")], mnode.span, append_base=True)
        slices = doc.items["slices"]
        if not isinstance(slices, YSeq) or not slices.items:
            self.fail("`slices` must be a list of slices", slices.span)
        parts = [self.slice(s, f"slices[{i}]", method_name, method, base_ref, doc.items.get("base_model"),
                            top, mnode.span)
                 for i, s in enumerate(slices.items)]
        return parts[0] if len(parts) == 1 else _Call("stack", parts, [])

    def params_map(self, node: YMap, key: str) -> YMap | None:
        value = node.get(key)
        if value is None or (isinstance(value, YScalar) and value.value is None):
            return None
        if not isinstance(value, YMap):
            self.fail(f"`{key}` must be a mapping of parameter names to values, found {_describe(value)}",
                      value.span, code=TYPE)
        return value

    def model_list(self, node, where: str) -> list[_Input]:
        if not isinstance(node, YSeq) or not node.items:
            self.fail(f"`{where}` must be a list of `- model: ...` entries", node.span, code=TYPE)
        inputs = []
        for i, entry in enumerate(node.items):
            at = f"{where}[{i}]"
            if not isinstance(entry, YMap) or "model" not in entry:
                self.fail(f"`{at}` must have a `model`", entry.span, code=TYPE)
            for key, key_span in entry.keys.items():
                if key not in ("model", "parameters"):
                    self.fail(f"`{at}.{key}` cannot be translated: a model entry has `model` and `parameters`",
                              key_span)
            ref = self.parse_ref(entry.items["model"], f"{at}.model")
            name = self.bind(ref, entry.items["model"].span)
            inputs.append(_Input(ref, name, self.params_map(entry, "parameters"), at, entry.items["model"].span))
        return inputs

    def slice(self, node, where, method_name, method, base_ref, base_node, top, method_span):
        if not isinstance(node, YMap) or "sources" not in node:
            self.fail(f"`{where}` must have `sources`", node.span, code=TYPE)
        for key, key_span in node.keys.items():
            if key == "residual_weight":
                self.fail(f"`{where}.residual_weight` cannot be translated: mergelang has no residual weight "
                          "for slices", key_span)
            if key not in ("sources", "base_model", "parameters"):
                self.fail(f"`{where}.{key}` cannot be translated: a slice has `sources`, `base_model` and "
                          "`parameters`", key_span)
        sources = node.items["sources"]
        if not isinstance(sources, YSeq) or not sources.items:
            self.fail(f"`{where}.sources` must be a list of `- model: ...` entries", sources.span, code=TYPE)
        inputs, lengths = [], set()
        for i, entry in enumerate(sources.items):
            at = f"{where}.sources[{i}]"
            if not isinstance(entry, YMap) or "model" not in entry or "layer_range" not in entry:
                self.fail(f"`{at}` must have a `model` and a `layer_range`", entry.span, code=TYPE)
            for key, key_span in entry.keys.items():
                if key not in ("model", "layer_range", "parameters"):
                    self.fail(f"`{at}.{key}` cannot be translated: a slice source has `model`, `layer_range` "
                              "and `parameters`", key_span)
            ref = self.parse_ref(entry.items["model"], f"{at}.model")
            name = self.bind(ref, entry.items["model"].span)
            lr = entry.items["layer_range"]
            bounds = plain(lr)
            if not (isinstance(bounds, list) and len(bounds) == 2
                    and all(isinstance(b, int) and not isinstance(b, bool) for b in bounds)
                    and 0 <= bounds[0] < bounds[1]):
                self.fail(f"`{at}.layer_range` must be [START, END] with 0 <= START < END, found {bounds!r}",
                          lr.span, code=TYPE)
            lengths.add(bounds[1] - bounds[0])
            inputs.append(_Input(ref, f"layer_range({name}, {bounds[0]}, {bounds[1]})",
                                 self.params_map(entry, "parameters"), at, entry.items["model"].span))
        if len(lengths) > 1:
            self.fail(f"`{where}`: every source of a slice must have as many layers, found "
                      + ", ".join(str(n) for n in sorted(lengths)), sources.span)
        if "base_model" in node:
            base_node = node.items["base_model"]
            base_ref = self.parse_ref(base_node, f"{where}.base_model")
        scopes = [(self.params_map(node, "parameters"), f"{where}.parameters"), (top, "parameters")]
        return self.merge(method_name, method, inputs, base_ref, base_node, scopes, method_span,
                          append_base=False, where=where)

    def merge(self, method_name, method, inputs, base_ref, base_node, scopes, method_span, *, append_base,
              where="models"):
        """The method call over the inputs, with every parameter resolved as mergekit resolves it."""
        base = None
        if method.base == "ignored":
            if append_base and base_ref is not None and all(i.ref != base_ref for i in inputs):
                # mergekit adds a base_model missing from `models` as one more input
                inputs = inputs + [_Input(base_ref, self.bind(base_ref, base_node.span), None, "base_model",
                                          base_node.span)]
            others = inputs
        else:
            if base_ref is None and method.base == "required":
                self.fail(f"`{method_name}` needs a `base_model`", method_span,
                          help="add `base_model: ...` naming the model the others are merged onto")
            others = [i for i in inputs if i.ref != base_ref]
            if base_ref is not None:
                found = [i for i in inputs if i.ref == base_ref]
                if found:
                    base = found[0].expr
                elif append_base:
                    base = self.bind(base_ref, base_node.span)
                else:
                    self.fail(f"`{where}`: the base model is not among the slice's sources", base_node.span,
                              help="add the base model to the sources, with the same layer_range")
        counts = {"pair": (1, 1, "one model besides the base"), "one": (1, 1, "exactly one model")}
        if method_name == "nuslerp":
            counts["models,base="] = (2, 2, "exactly two models besides the base")
        low, high, what = counts.get(method.shape, (1, None, "at least one model besides the base"))
        if not low <= len(others) <= (high or len(others)):
            self.fail(f"`{method_name}` merges {what}; `{where}` gives {len(others)}",
                      method_span, code=TYPE)
        kwargs = []
        for param, default in method.per_model.items():
            values = []
            for inp in others:
                own = [(inp.params, f"{inp.where}.parameters")]
                value = self.resolve(param, own + scopes, default, inp.span,
                                     f"each model of `{method_name}`; `{inp.where}` has none")
                values.append(value)
            if all(v is None for v in values):
                continue  # nobody sets it: the stdlib def's default, which is mergekit's
            values = [v if v is not None else self.scalar(YScalar(default, inp.span), param)
                      for v, inp in zip(values, others)]
            if method.shape == "one":
                if any(inp.params is not None and param in inp.params for inp in others) or \
                        any(scope is not None and param in scope for scope, _ in scopes):
                    kwargs.append((param, values[0]))
            else:
                kwargs.append((KEYWORD.get(param, param), _List(values)))
        seen_shared = []
        for scope, _ in reversed(scopes):
            if scope is not None:
                seen_shared += [k for k in scope.items if k in method.shared and k not in seen_shared]
        for param in list(dict.fromkeys([p for p, d in method.shared.items() if d is REQUIRED] + seen_shared)):
            value = self.resolve(param, scopes, method.shared[param], method_span, f"`{method_name}`")
            if value is not None:
                kwargs.append((param, value))
        self.check_unknown(method_name, method, others, inputs, scopes)
        if method.shape == "base+models":
            return _Call(method_name, [base, _List([i.expr for i in others])], kwargs)
        if method.shape == "models":
            return _Call(method_name, [_List([i.expr for i in others])], kwargs)
        if method.shape == "pair":
            return _Call(method_name, [base, others[0].expr], kwargs)
        if method.shape == "one":
            return _Call("passthrough", [others[0].expr], kwargs) if kwargs else others[0].expr
        return _Call(method_name, [_List([i.expr for i in others])], kwargs + ([("base", base)] if base else []))

    def check_unknown(self, method_name, method, others, inputs, scopes):
        """Parameters mergekit does not use for this method are left out, with a note."""
        known = set(method.per_model) | set(method.shared)
        for scope, where in scopes:
            for key, span in (scope.keys.items() if scope is not None else ()):
                if key not in known:
                    self.notes.append(f"ignored `{where}.{key}` (line {span.line}): `{method_name}` does not "
                                      f"use `{key}`")
        for inp in inputs:
            for key, span in (inp.params.keys.items() if inp.params is not None else ()):
                if key in method.shared:
                    self.notes.append(f"ignored `{inp.where}.parameters.{key}` (line {span.line}): `{key}` is "
                                      f"not set per model in `{method_name}`, as in mergekit")
                elif key not in known:
                    self.notes.append(f"ignored `{inp.where}.parameters.{key}` (line {span.line}): "
                                      f"`{method_name}` does not use `{key}`")

    # -- output options

    def output_options(self, doc: YMap, base_ref: _Ref | None) -> tuple[list[tuple[str, str]], list[str]]:
        options, comments = [], []
        tok = doc.get("tokenizer_source")
        if tok is not None and not (isinstance(tok, YScalar) and tok.value is None):
            if isinstance(tok, YScalar) and tok.value == "union":
                self.fail("`tokenizer_source: union` cannot be translated: mergelang does not merge vocabularies",
                          tok.span, help="use `tokenizer_source: base` or name one model")
            if isinstance(tok, YScalar) and tok.value == "base":
                if base_ref is None:
                    self.fail("`tokenizer_source: base` needs a `base_model`", tok.span)
                ref = base_ref
            else:
                ref = self.parse_ref(tok, "tokenizer_source")
            if ref.path in self.docs and ref.revision is None:
                self.fail(f"`tokenizer_source` is the intermediate merge {ref.path!r}, which is not a model on "
                          "disk here; `tokenizer=` must name a model", tok.span,
                          help="name the model whose tokenizer that merge carries (its base_model or first model)")
            # `tokenizer=` names a model: a MODEL+LORA's tokenizer is its model's (an adapter adds none).
            options.append(("tokenizer", self.bind(_Ref(ref.path, ref.revision), tok.span)))
        template = doc.get("chat_template")
        if template is not None and not (isinstance(template, YScalar) and template.value is None):
            if not isinstance(template, YScalar) or not isinstance(template.value, str):
                self.fail(f"`chat_template` must be a string, found {_describe(template)}", template.span,
                          code=TYPE)
            options.append(("chat_template", _string(template.value)))
        dtype = self.dtype(doc, "dtype")
        out_dtype = self.dtype(doc, "out_dtype") or dtype
        if dtype is not None and dtype != "fp32":
            comments.append(f"mergekit computes this merge in {_DTYPE_WORDS[dtype]} (`dtype`); mergelang always "
                            "computes in float32")
        if out_dtype is not None:
            options.append(("dtype", _string(out_dtype)))
        return options, comments

    def dtype(self, doc: YMap, key: str) -> str | None:
        node = doc.get(key)
        if node is None or (isinstance(node, YScalar) and node.value is None):
            return None
        code = _DTYPES.get(str(node.value).lower()) if isinstance(node, YScalar) else None
        if code is None:
            self.fail(f"`{key}`: unknown dtype {_describe(node)}", node.span, code=TYPE,
                      help="expected one of float16, bfloat16, float32, float64")
        return code


def _describe(node) -> str:
    if isinstance(node, YScalar):
        return repr(node.value) if node.value is not None else "nothing"
    return "a list" if isinstance(node, YSeq) else "a mapping"


def translate(text: str, file: str = "config.yml") -> str:
    """The mergelang spec for a mergekit config (one document, or several as mergekit-multi reads them)."""
    tr = _Translator()
    docs = load_all(text, file)
    if not docs:
        tr.fail("the config is empty", Span(file, 1, 1, 1, 1))
    for doc in docs:
        if not isinstance(doc, YMap):
            tr.fail(f"a mergekit config is a mapping of settings, found {_describe(doc)}", doc.span, code=TYPE)
    names: dict[str, YMap] = {}
    for doc in docs:
        node = doc.get("name")
        if node is not None and len(docs) > 1:
            if not isinstance(node, YScalar) or not isinstance(node.value, str) or not node.value:
                tr.fail(f"`name` must be a string, found {_describe(node)}", node.span, code=TYPE)
            if node.value in names:
                tr.fail(f"two merges are named {node.value!r}", node.span, code=SYNTAX)
            names[node.value] = doc
    if len(docs) > 1:
        unnamed = [d for d in docs if d.get("name") is None]
        if len(unnamed) > 1:
            tr.fail("only one merge of a multi-document config may be without a `name`", unnamed[1].span)
    output_doc, order = _order(tr, docs, names)

    statements = []
    intermediate_dtypes = []
    for doc in order:
        if doc is not output_doc:
            name_node = doc.items["name"]
            bound = tr.fresh(name_node.value)
            tr.docs[name_node.value] = bound
    for doc in order:
        expr = tr.document(doc)
        if doc is output_doc:
            base_ref = tr.parse_ref(doc.items["base_model"], "base_model") if "base_model" in doc else None
            options, comments = tr.output_options(doc, base_ref)
            tail = "".join(f", {k}={v}" for k, v in options)
            statements.append("output " + _pretty(expr, 0, 7 + len(tail)) + tail)
        else:
            bound = tr.docs[doc.items["name"].value]
            statements.append(f"{bound} = " + _pretty(expr, 0, len(bound) + 3))
            for key in ("tokenizer_source", "chat_template", "out_dtype", "dtype"):
                if key in doc:
                    if key in ("dtype", "out_dtype"):
                        intermediate_dtypes.append(doc.items["name"].value)
                    else:
                        tr.notes.append(f"ignored `{key}` of the merge {doc.items['name'].value!r} (line "
                                        f"{doc.keys[key].line}): only the final merge's output options apply")
    header = [f"# Translated from the mergekit config {Path(file).name} by `mergelang import`."]
    header += [f"# {c}." for c in comments]
    for name in dict.fromkeys(intermediate_dtypes):
        header.append(f"# mergekit-multi writes the merge {name!r} to disk in its dtype; here it stays float32.")
    header += [f"# note: {n}" for n in dict.fromkeys(tr.notes)]
    return "\n".join(header) + "\n\n" + "\n".join(tr.model_lines) + "\n\n" + "\n".join(statements) + "\n"


def _order(tr: _Translator, docs: list[YMap], names: dict[str, YMap]) -> tuple[YMap, list[YMap]]:
    """The final merge, and every merge after the ones it uses (mergekit-multi's dependency order)."""
    if len(docs) == 1:
        return docs[0], docs
    uses: dict[int, list[str]] = {}
    for doc in docs:
        refs = []
        for value in _model_values(doc):
            if isinstance(value, YScalar) and isinstance(value.value, str):
                path = value.value.split("+")[0]
                if path in names:
                    refs.append(path)
        uses[id(doc)] = refs
    used = {n for refs in uses.values() for n in refs}
    finals = [d for d in docs if d.get("name") is None or d.items["name"].value not in used]
    if len(finals) != 1:
        listed = ", ".join(repr(d.items["name"].value) if d.get("name") else "the unnamed merge" for d in finals)
        tr.fail(f"a spec has one output, but nothing uses the merges {listed}", finals[-1].span,
                help="refer to the intermediate merges by name from the final one, or split the config")
    order: list[YMap] = []
    state: dict[int, str] = {}

    def visit(doc: YMap, chain: list[str]):
        if state.get(id(doc)) == "done":
            return
        if state.get(id(doc)) == "active":
            tr.fail("the merges refer to each other in a cycle: " + " → ".join(chain), doc.span)
        state[id(doc)] = "active"
        for name in uses[id(doc)]:
            visit(names[name], chain + [name])
        state[id(doc)] = "done"
        order.append(doc)

    visit(finals[0], [str(plain(finals[0].get("name")) or "final")])
    return finals[0], order


def _model_values(doc: YMap):
    for key in ("base_model", "tokenizer_source"):
        if key in doc:
            yield doc.items[key]
    for group in ("models", "slices"):
        node = doc.get(group)
        if not isinstance(node, YSeq):
            continue
        for entry in node.items:
            if not isinstance(entry, YMap):
                continue
            if "model" in entry:
                yield entry.items["model"]
            if "base_model" in entry:
                yield entry.items["base_model"]
            sources = entry.get("sources")
            if isinstance(sources, YSeq):
                yield from (s.items["model"] for s in sources.items if isinstance(s, YMap) and "model" in s)


def translate_file(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MergelangError(Diagnostic(INPUT, f"config file not found: {path}", help="check the path")) from None
    except (OSError, UnicodeDecodeError) as e:
        raise MergelangError(Diagnostic(INPUT, f"cannot read the config file {path}: {e}")) from None
    return translate(text, str(path))


def write_spec(spec: str, out: Path, *, force: bool) -> None:
    """Write the spec to `out` (replaced only with force), atomically."""
    import os
    import tempfile

    if out.exists() and not force:
        raise MergelangError(Diagnostic(OUTPUT_PATH, f"{out} already exists", help="pass --force to replace it"))
    if out.is_dir():
        raise MergelangError(Diagnostic(OUTPUT_PATH, f"{out} is a folder; expected a file name for the spec"))
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        raise MergelangError(Diagnostic(OUTPUT_PATH, f"the folder {folder} does not exist"))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(spec)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
