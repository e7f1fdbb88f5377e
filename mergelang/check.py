"""Static checks against the inputs' headers, and the per-tensor plan that `run` executes.

Everything here reads safetensors headers only, never tensor data: `mergelang check` finds
missing inputs, corrupt files, missing tensors, shape mismatches, non-float dtypes and
out-of-range per-tensor parameters before a byte of weights is read.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from .diagnostics import (
    ARITHMETIC, CORRUPT, DTYPE, INPUT, MISSING_TENSOR, NO_MATCH, RANGE, SHAPE, TYPE, Reporter,
)
from .graph import Node, walk
from .io import Checkpoint, CheckpointError
from .io.writer import Sized
from .lower import Lowered
from .ops import OPS
from .optimize import FoldError, optimize
from .specialize import LayerInfo, NoMatchingArm, layer_index, specialize
from . import stacking

FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
# Matrices with one row per vocabulary entry: models with different vocabularies disagree on their
# row count only, and (as in mergekit) the merge keeps the rows they have in common.
EMBEDDING_NAMES = ("embed_tokens", "lm_head", "wte", "word_embeddings", "embed_in", "embed_out", "tok_embeddings")
DTYPE_ALIASES = {
    "bf16": "BF16", "bfloat16": "BF16", "fp16": "F16", "float16": "F16", "half": "F16",
    "fp32": "F32", "float32": "F32", "float": "F32", "fp64": "F64", "float64": "F64",
}
TORCH_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}


@dataclass(frozen=True)
class TensorPlan(Sized):
    name: str
    graph: Node  # specialized and optimized for this tensor
    shape: tuple[int, ...]
    dtype: str  # output safetensors dtype code


@dataclass
class Plan:
    lowered: Lowered
    checkpoints: dict[str, Checkpoint]  # model key → open checkpoint
    reference: str  # the model whose tensor list, config and tokenizer the output takes
    tensors: list[TensorPlan] = field(default_factory=list)
    config_updates: dict = field(default_factory=dict)  # e.g. vocab_size after cutting embeddings

    @property
    def output_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def close(self) -> None:
        for c in self.checkpoints.values():
            c.close()


def parse_dtype(text: str | None) -> str | None:
    if text is None:
        return None
    code = DTYPE_ALIASES.get(text.lower())
    if code is None:
        raise ValueError(f"unknown dtype {text!r}; expected one of bf16, fp16, fp32, fp64")
    return code


def resolve_inputs(lowered: Lowered, overrides: dict[str, Path], reporter: Reporter) -> dict[str, Path]:
    """Each input's folder, after `--model NAME=PATH` (NAME is the bound name or the path as written)."""
    folders = {key: m.folder for key, m in lowered.inputs.items()}
    for name, path in overrides.items():
        hits = [key for key, m in lowered.inputs.items() if name in (key, m.path_text)]
        if not hits:
            known = ", ".join(lowered.inputs) or "none"
            reporter.error(INPUT, f"--model {name}=...: the spec has no model named `{name}`",
                           help=f"the spec's models are: {known}")
        for key in hits:
            folders[key] = Path(path).expanduser().resolve()
    return folders


def open_inputs(lowered: Lowered, folders: dict[str, Path], reporter: Reporter) -> dict[str, Checkpoint]:
    opened: dict[str, Checkpoint] = {}
    for key, model in lowered.inputs.items():
        try:
            opened[key] = Checkpoint.open(folders[key])
        except CheckpointError as e:
            missing = not folders[key].exists()
            reporter.error(INPUT if missing else CORRUPT,
                           f"model `{key}`: {e.message}" if missing else f"model `{key}`: {e}",
                           model.span, label="this model",
                           notes=(f"looked in {folders[key]}",) if missing else (),
                           help=("relative paths are relative to the spec's folder; "
                                 f"or pass --model {key}=PATH") if missing else
                           "the file is damaged or incomplete; copy or download it again")
    return opened


class _Grouped:
    """Many tensors with the same problem become one diagnostic with a count."""

    def __init__(self):
        self.items: dict[tuple, list[str]] = defaultdict(list)
        self.notes: dict[tuple, str | None] = {}

    def add(self, key: tuple, tensor: str) -> None:
        if tensor not in self.items[key][-1:]:
            self.items[key].append(tensor)


def _examples(tensors: list[str], n: int = 3) -> str:
    shown = ", ".join(f"`{t}`" for t in tensors[:n])
    return shown + (f" and {len(tensors) - n} more" if len(tensors) > n else "")


def build_plan(lowered: Lowered, overrides: dict[str, Path] | None = None, dtype: str | None = None,
               reporter: Reporter | None = None) -> Plan:
    """Open every input's headers and plan each output tensor; raises MergelangError on any problem."""
    reporter = reporter or Reporter()
    out_dtype = parse_dtype(dtype)
    folders = resolve_inputs(lowered, overrides or {}, reporter)
    checkpoints = open_inputs(lowered, folders, reporter)
    try:
        reporter.raise_if_errors()
        plan = Plan(lowered, checkpoints, lowered.reference_model().key)
        _plan_tensors(plan, out_dtype, reporter)
        reporter.raise_if_errors()
    except BaseException:
        for c in checkpoints.values():
            c.close()
        raise
    return plan


def _plan_tensors(plan: Plan, out_dtype: str | None, reporter: Reporter) -> None:
    lowered = plan.lowered
    ref = plan.checkpoints[plan.reference]
    layers = LayerInfo.from_model(list(ref.tensors), ref.config)
    missing, no_match, shapes, dtypes, not_tensor, ranges, folds, cuts = (_Grouped() for _ in range(8))
    used_models: set[str] = set()
    stacked = _stacking(plan, reporter) if stacking.is_stacked(lowered.output) else None
    if stacked is False:
        return
    names = [(name, info.dtype) for name, info in ref.tensors.items()] if stacked is None else \
        stacking.output_tensors(stacked, plan.checkpoints, plan.reference)
    for name, source_dtype in names:
        try:
            graph = optimize(specialize(lowered.output, name, layers, lowered.spans) if stacked is None
                             else stacked.specialize(name), lowered.spans)
        except NoMatchingArm as e:
            no_match.add((e.node,), name)
            continue
        except FoldError as e:
            folds.add((e.message, lowered.spans.first(e.node)), name)
            continue
        shape = _infer(graph, name, plan, missing, shapes, dtypes, used_models, cuts)
        _check_params(graph, name, lowered, ranges)
        if shape is _BAD:
            continue
        if shape is None:
            not_tensor.add((graph,), name)
            continue
        plan.tensors.append(TensorPlan(name, graph, shape, out_dtype or source_dtype))
    spans = lowered.spans
    for (key,), tensors in missing.items.items():
        reporter.error(MISSING_TENSOR, f"model `{key}` has no tensor {_examples(tensors)}, which `{plan.reference}` has",
                       lowered.inputs[key].span, label=f"{len(tensors)} tensor{'s' * (len(tensors) > 1)} missing",
                       notes=(f"`{key}` is {plan.checkpoints[key].path}",),
                       help="all models in a formula must have the same tensors")
    for (rows, found), tensors in cuts.items.items():
        reporter.warn(SHAPE, f"the models' vocabularies differ: {_examples(tensors)} "
                             f"{'has' if len(tensors) == 1 else 'have'} {found}; the output keeps the "
                             f"{rows} rows they have in common, as mergekit does", lowered.output_span)
        if rows != ref.tensors[tensors[0]].shape[0]:
            plan.config_updates["vocab_size"] = rows
    for (message, span), tensors in folds.items.items():
        where = "" if len(tensors) == len(ref.tensors) else f" (for {_examples(tensors)})"
        reporter.error(ARITHMETIC, f"{message}{where}", span, label="divides by 0")
    for (node,), tensors in no_match.items.items():
        patterns = ", ".join(f'"{p}"' for p in node.attr("patterns") if p is not None)
        reporter.error(NO_MATCH, f"no arm of `match tensor` matches {_examples(tensors)}", spans.first(node),
                       notes=(f"the patterns are {patterns}",), help="add a default arm `_ => VALUE`")
    for (node, a, b), tensors in shapes.items.items():
        reporter.error(SHAPE, f"shapes differ in `{node.op}`: {a} vs {b}, for {_examples(tensors)}",
                       spans.first(node), label="these operands", help="elementwise operations need equal shapes")
    for (key, code), tensors in dtypes.items.items():
        reporter.error(DTYPE, f"cannot compute in {code}: model `{key}` stores {_examples(tensors)} as {code}",
                       lowered.inputs[key].span, help="mergelang merges floating-point tensors (F16, BF16, F32, F64)")
    for (graph,), tensors in not_tensor.items.items():
        reporter.error(TYPE, f"for {_examples(tensors)} the output is the number {graph!r}, not a tensor",
                       lowered.output_span, help="every output tensor must involve a model")
    for (op, param, message, value, span), tensors in ranges.items.items():
        where = "" if len(tensors) == len(ref.tensors) else f" (for {_examples(tensors)})"
        note = ranges.notes.get((op, param, message, value, span))
        reporter.error(RANGE, f"`{param}` of `{op}` {message}, got {value:g}{where}", span, label="out of range",
                       notes=(note,) if note else ())
    _warn_unused(plan, used_models, reporter)


def _stacking(plan: Plan, reporter: Reporter):
    """The layer structure of a stacked output (and its config's new layer count), or False after
    reporting a problem with it."""
    ref = plan.checkpoints[plan.reference]
    try:
        stacked = stacking.prepare(plan.lowered.output, plan.checkpoints, plan.lowered.spans)
    except stacking.StackError as e:
        spans = plan.lowered.spans
        span = (spans.arg(e.node, e.arg)[0] if e.arg is not None else None) or spans.first(e.node)
        reporter.error(e.code, e.message, span, help=e.help)
        return False
    plan.config_updates.update(stacking.config_updates(stacked, plan.checkpoints, plan.reference))
    return stacked


_BAD = object()


def _common_rows(graph: Node, tensor: str, plan: Plan, cuts) -> int | None:
    """For an embedding matrix whose models differ only in their number of rows: the smallest."""
    if not any(part in tensor for part in EMBEDDING_NAMES):
        return None
    infos = {n.attr("model"): plan.checkpoints[n.attr("model")].tensors.get(n.attr("tensor") or tensor)
             for n in walk(graph) if n.op == "load"}
    shapes = {key: info.shape for key, info in infos.items() if info is not None and info.shape}
    if len({s[0] for s in shapes.values()}) < 2 or len({s[1:] for s in shapes.values()}) != 1:
        return None
    rows = min(s[0] for s in shapes.values())
    cuts.add((rows, ", ".join(f"{s[0]} rows in `{key}`" for key, s in shapes.items())), tensor)
    return rows


def _infer(graph: Node, tensor: str, plan: Plan, missing, shapes, dtypes, used: set[str], cuts):
    """The output shape for this tensor, or None for a scalar, or _BAD after recording a problem."""
    shape_of: dict[Node, object] = {}
    bad = False
    rows = _common_rows(graph, tensor, plan, cuts)
    for n in walk(graph):
        if n.op == "const":
            shape_of[n] = None
        elif n.op == "load":
            key = n.attr("model")
            used.add(key)
            source = n.attr("tensor") or tensor  # a load inside `layer_range` reads another layer
            info = plan.checkpoints[key].tensors.get(source)
            if info is None:
                missing.add((key,), source)
                shape_of[n], bad = _BAD, True
            else:
                if info.dtype not in FLOAT_DTYPES:
                    dtypes.add((key, info.dtype), tensor)
                    bad = True
                # Chunks are rows, so reading only the first `rows` rows of each model cuts the matrix.
                shape_of[n] = info.shape if rows is None else (rows,) + tuple(info.shape[1:])
        else:
            found = [shape_of[a] for a in n.args if shape_of[a] is not None]
            if any(s is _BAD for s in found):
                shape_of[n] = _BAD
                continue
            distinct = list(dict.fromkeys(found))
            if len(distinct) > 1:
                shapes.add((n, list(distinct[0]).__repr__(), list(distinct[1]).__repr__()), tensor)
                shape_of[n], bad = _BAD, True
            else:
                shape_of[n] = distinct[0] if distinct else None
    return _BAD if bad else shape_of[graph]


def _check_params(graph: Node, tensor: str, lowered: Lowered, ranges) -> None:
    """Range checks of constant parameters; grouped by (op, parameter, message, value, place)."""
    spans = lowered.spans

    def report(n: Node, index: int, name: str, message: str) -> None:
        value = n.args[index].attr("value")
        span, note = spans.arg(n, index)
        key = (n.op, name, message, value, span or spans.first(n))
        ranges.add(key, tensor)
        ranges.notes.setdefault(key, note)  # one diagnostic per place, whichever def line it went through

    for n in walk(graph):
        spec = OPS.get(n.op)
        if spec is None or not spec.params:
            continue
        n_in, slots = spec.layout(len(n.args))
        for p, s in slots:
            for index in range(s.start, s.stop):
                a = n.args[index]
                if p.check is not None and a.op == "const" and (message := p.check(a.attr("value"))):
                    report(n, index, p.name, message)
        if spec.check_all is not None and all(a.op == "const" for a in n.args[n_in:]):
            _, params = spec.bind([None] * n_in + [a.attr("value") for a in n.args[n_in:]])
            for name, message in spec.check_all(params):
                report(n, next(s.start for p, s in slots if p.name == name), name, message)


def _warn_unused(plan: Plan, used: set[str], reporter: Reporter) -> None:
    ref = plan.checkpoints[plan.reference]
    stacked = stacking.is_stacked(plan.lowered.output)
    for key, ckpt in plan.checkpoints.items():
        if key not in used:
            continue
        extra = [t for t in ckpt.tensors if t not in ref.tensors
                 and not (stacked and layer_index(t) is not None)]  # a stack picks its layers
        if extra:
            reporter.warn(MISSING_TENSOR, f"model `{key}` has tensors that `{plan.reference}` lacks; they are "
                                          f"left out of the output: {_examples(extra)}",
                          plan.lowered.inputs[key].span)
