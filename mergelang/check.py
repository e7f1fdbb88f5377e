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
from .io.hub import HubError, locate
from .io.writer import Sized
from .lora import open_lora
from .lower import Lowered
from .ops import OPS
from .optimize import FoldError, optimize
from .output_options import DTYPE_ALIASES
from .output_plan import (
    TIED, config_updates, is_recomputed_buffer, report_ties, report_vocab, tie_heads, vocab_rows,
)
from .specialize import LayerInfo, NoMatchingArm, layer_index, specialize
from . import stacking

FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
# Matrices with one row per vocabulary entry: models with different vocabularies disagree on their
# row count only, and (as in mergekit) the merge keeps the rows they have in common.
EMBEDDING_NAMES = ("embed_tokens", "lm_head", "wte", "word_embeddings", "embed_in", "embed_out", "tok_embeddings")
TORCH_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}


@dataclass(frozen=True)
class TensorPlan(Sized):
    name: str
    graph: Node  # specialized and optimized for this tensor
    shape: tuple[int, ...]
    dtype: str  # output safetensors dtype code
    # (model, first row): rows from `first row` on are copied from that model (the tokenizer model's
    # embedding rows beyond the vocabulary every model shares); the graph computes the rows before.
    tail: tuple[str, int] | None = None

    @property
    def graph_shape(self) -> tuple[int, ...]:
        """The shape the graph computes: the whole tensor, or the rows before the tail."""
        return self.shape if self.tail is None else (self.tail[1],) + tuple(self.shape[1:])


@dataclass
class Plan:
    lowered: Lowered
    checkpoints: dict[str, Checkpoint]  # model key → open checkpoint
    reference: str  # the model whose tensor list (and by default config and tokenizer) the output takes
    tensors: list[TensorPlan] = field(default_factory=list)
    config_updates: dict = field(default_factory=dict)  # e.g. vocab_size after cutting embeddings
    vocab_rows: dict[str, tuple[int, int]] = field(default_factory=dict)  # tensor → (merged, output) rows

    @property
    def config_source(self) -> str:
        """The model whose config.json and generation_config.json the output carries."""
        return self.lowered.options.config or self.reference

    @property
    def tokenizer_source(self) -> str:
        """The model whose tokenizer files (and vocabulary size) the output carries."""
        return self.lowered.options.tokenizer or self.reference

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


def resolve_inputs(lowered: Lowered, overrides: dict[str, Path], reporter: Reporter,
                   strict: bool = False) -> dict[str, Path]:
    """Each input's folder, after `--model NAME=PATH` (NAME is the bound name or the path as written).

    A path that is not an existing folder but looks like a hub id `owner/name` is looked up in the
    local Hugging Face cache (io/hub.py). With `strict`, an input that cannot be located there (or
    `revision=` on a local folder) is reported and left out; without, it keeps the folder as written.
    """
    chosen: dict[str, Path] = {}
    for name, path in overrides.items():
        hits = [key for key, m in lowered.inputs.items() if name in (key, m.path_text)]
        if not hits:
            known = ", ".join(lowered.inputs) or "none"
            reporter.error(INPUT, f"--model {name}=...: the spec has no model named `{name}`",
                           help=f"the spec's models are: {known}")
        for key in hits:
            chosen[key] = Path(path)
    folders: dict[str, Path] = {}
    for key, m in lowered.inputs.items():
        given = chosen.get(key)
        try:
            if given is None:
                folders[key] = locate(m.path_text, m.folder, m.revision)
            else:
                folders[key] = locate(str(given), given.expanduser().resolve())
        except HubError as e:
            if not strict:
                folders[key] = m.folder if given is None else given.expanduser().resolve()
                continue
            notes = e.notes + ((f"`{key}` was given by --model {key}={given}",) if given is not None else ())
            help = f"{e.help}; or pass --model {key}=PATH" if e.absent else e.help
            reporter.error(INPUT, f"model `{key}`: {e.message}", m.span, label="this model", notes=notes, help=help)
    return folders


def open_inputs(lowered: Lowered, folders: dict[str, Path], reporter: Reporter) -> dict[str, Checkpoint]:
    opened: dict[str, Checkpoint] = {}
    for key, model in lowered.inputs.items():
        if key not in folders:  # already reported by resolve_inputs
            continue
        if model.kind == "lora":
            open_lora(key, model, folders[key], opened, reporter)
            continue
        try:
            opened[key] = Checkpoint.open(folders[key])
        except CheckpointError as e:
            missing = not folders[key].exists()
            reporter.error(INPUT if missing else CORRUPT,
                           f"model `{key}`: {e.message}" if missing else f"model `{key}`: {e}",
                           model.span, label="this model",
                           notes=(f"looked in {folders[key]}",) if missing else (),
                           help=missing_help(key, model, folders[key]) if missing else
                           "the file is damaged or incomplete; copy or download it again")
    return opened


def missing_help(key: str, model, folder: Path) -> str:
    """Where a missing input's path was taken relative to: the spec's folder, or (--model) the working folder."""
    if folder != model.folder:
        return f"the path given by --model {key}=... is relative to the working folder"
    return f"relative paths are relative to the spec's folder; or pass --model {key}=PATH"


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
    out_dtype = parse_dtype(dtype) or lowered.options.dtype
    folders = resolve_inputs(lowered, overrides or {}, reporter, strict=True)
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
    ties = tie_heads(plan)
    stacked = _stacking(plan, reporter) if stacking.is_stacked(lowered.output) else None
    if stacked is False:
        return
    names = [(name, info.dtype) for name, info in ref.tensors.items()] if stacked is None else \
        stacking.output_tensors(stacked, plan.checkpoints, plan.reference)
    for name, source_dtype in names:
        if is_recomputed_buffer(name):
            continue
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
        tail = None
        if name in plan.vocab_rows:
            common, rows = plan.vocab_rows[name]
            shape = (rows,) + tuple(shape[1:])
            tail = (plan.lowered.options.tokenizer, common) if rows > common else None
        plan.tensors.append(TensorPlan(name, graph, shape, out_dtype or source_dtype, tail))
    spans = lowered.spans
    for (key,), tensors in missing.items.items():
        reporter.error(MISSING_TENSOR, f"model `{key}` has no tensor {_examples(tensors)}, which `{plan.reference}` has",
                       lowered.inputs[key].span, label=f"{len(tensors)} tensor{'s' * (len(tensors) > 1)} missing",
                       notes=(f"`{key}` is {plan.checkpoints[key].path}",),
                       help="all models in a formula must have the same tensors")
    for (rows, found), tensors in cuts.items.items():
        reporter.warn(SHAPE, f"the models' vocabularies differ: {_examples(tensors)} "
                             f"{'has' if len(tensors) == 1 else 'have'} {found}; the output keeps the "
                             f"{rows} rows they have in common, as mergekit does", lowered.output_span,
                      help="with `output ..., tokenizer=MODEL` the output keeps MODEL's vocabulary")
    widened: dict[tuple[int, int], list[str]] = defaultdict(list)
    for tensor, rows in plan.vocab_rows.items():
        widened[rows].append(tensor)
    report_vocab(plan, widened, reporter)
    report_ties(plan, ties, used_models, reporter)
    plan.config_updates.update(config_updates(plan, plan.checkpoints[plan.config_source].config))
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
                       lowered.inputs[key].span,
                       notes=(f"`{tensors[0]}` is in {plan.checkpoints[key].tensors[tensors[0]].path}",), help="mergelang merges floating-point tensors (F16, BF16, F32, F64)")
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
    try:
        stacked = stacking.prepare(plan.lowered.output, plan.checkpoints, plan.lowered.spans)
    except stacking.StackError as e:
        spans = plan.lowered.spans
        span = (spans.arg(e.node, e.arg)[0] if e.arg is not None else None) or spans.first(e.node)
        reporter.error(e.code, e.message, span, help=e.help)
        return False
    plan.config_updates.update(stacking.config_updates(stacked, plan.checkpoints, plan.config_source))
    return stacked


_BAD = object()


def _common_rows(graph: Node, tensor: str, plan: Plan, cuts) -> int | None:
    """For an embedding matrix whose models differ only in their number of rows: the smallest."""
    if not any(part in tensor for part in EMBEDDING_NAMES):
        return None
    infos = {n.attr("model"): plan.checkpoints[n.attr("model")].tensors.get(n.attr("tensor") or tensor)
             for n in walk(graph) if n.op == "load"}
    shapes = {key: info.shape for key, info in infos.items() if info is not None and info.shape}
    if plan.lowered.options.tokenizer and shapes:
        rows = vocab_rows(tensor, shapes, plan)
        if rows is not None and any(r != rows[1] for r in [rows[0]] + [s[0] for s in shapes.values()]):
            plan.vocab_rows[tensor] = rows
            return rows[0]
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
        extra = [t for t in ckpt.tensors if t not in ref.tensors and not is_recomputed_buffer(t) and t not in TIED
                 and not (stacked and layer_index(t) is not None)]  # a stack picks its layers
        if extra:
            reporter.warn(MISSING_TENSOR, f"model `{key}` has tensors that `{plan.reference}` lacks; they are "
                                          f"left out of the output: {_examples(extra)}",
                          plan.lowered.inputs[key].span)
