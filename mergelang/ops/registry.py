"""The primitive registry: one entry per op — its name, inputs, parameters with their checks, and kernel.

Three kinds of op, by what they need to see of a tensor:

- elementwise: `kernel(ctx, *inputs, **params)` on a chunk of whole rows (dim 0) of every input.
  Inputs are tensors of the chunk's shape, Python floats, or 0-d/row-wise statistics that
  broadcast. `ctx.start` is the flat index of the chunk's first element, so random ops draw the
  same numbers whatever the chunking.
- reduce: a statistic streamed over the chunks of its inputs, in one or more passes. `kernel` is
  a Reducer class: `Reducer(ctx, shape, **params)`, then for each pass `update(pass_, *chunks)`
  for every chunk in order, `end_pass(pass_)` returning True when done; `result()` returns a
  0-d tensor or a row-wise tensor of shape (rows, 1, ...) that broadcasts against chunks.
- tensor: `kernel(ctx, *inputs, **params)` on whole tensors (materialized in float32); returns a
  tensor of the output's shape, or a statistic as above. For ops that cannot stream.
- model: a statistic over every tensor of the model (all output tensors whose graph holds this
  node). A Reducer as for `reduce`, made with `Reducer(ctx, total_entries, **params)` and updated
  with the chunks of all those tensors in plan order; its 0-d result is computed before any tensor
  is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

REQUIRED = object()


@dataclass(frozen=True)
class Param:
    """A parameter. Kinds: number, int, bool, choice (one of `choices`, written as a string), and
    per_input (a number per input of a variadic op: a list of that length, or one number for all)."""

    name: str
    default: Any = REQUIRED
    kind: str = "number"
    check: Callable[[float], str | None] | None = None  # returns "must be in [0, 1)" or None
    choices: tuple[str, ...] = ()
    doc: str = ""

    def convert(self, value: float) -> Any:
        if self.kind == "int":
            return int(value)
        if self.kind == "bool":
            return bool(value)
        if self.kind == "choice":
            return self.choices[int(value)]
        return float(value)

    def encode(self, value: Any) -> float:
        """The number that stands for a bool or choice value in the graph."""
        if self.kind == "choice":
            return float(self.choices.index(value))
        return float(value)


@dataclass(frozen=True)
class OpDef:
    name: str
    inputs: int | None  # number of inputs; None: variadic (one or more, or a single list)
    params: tuple[Param, ...]
    kernel: Callable
    kind: str = "elementwise"  # elementwise | reduce | tensor | model
    random: bool = False
    tensor_inputs: bool = False  # inputs must be tensors, not scalars
    doc: str = ""
    # Checks that relate several parameters: called with the converted parameters (when they
    # are all known), returns (parameter name, message) pairs such as ("epsilon", "...").
    check_all: Callable[[dict[str, Any]], list[tuple[str, str]]] | None = None

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    def layout(self, n_args: int) -> tuple[int, list[tuple[Param, slice]]]:
        """How a node's args divide: the inputs first, then each parameter (n wide if per_input)."""
        n_scalar = sum(p.kind != "per_input" for p in self.params)
        n_in = (n_args - n_scalar) // (1 + len(self.params) - n_scalar)
        slots, pos = [], n_in
        for p in self.params:
            width = n_in if p.kind == "per_input" else 1
            slots.append((p, slice(pos, pos + width)))
            pos += width
        return n_in, slots

    def bind(self, args: list) -> tuple[list, dict[str, Any]]:
        """Split evaluated args (parameters as floats) into the inputs and the kernel's keyword arguments."""
        n_in, slots = self.layout(len(args))
        params = {p.name: [p.convert(v) for v in args[s]] if p.kind == "per_input" else p.convert(args[s][0])
                  for p, s in slots}
        return args[:n_in], params


@dataclass
class KernelContext:
    """Where a kernel call sits: which tensor, which slice of it, and the keys of random ops."""

    tensor: str = ""
    start: int = 0  # flat index of the chunk's first element
    seed: int = 0
    device: object = "cpu"  # "cpu", "cuda:0" or a torch.device: torch's functions take either
    key: int = 0  # set per node for random ops


OPS: dict[str, OpDef] = {}


def op(name: str, inputs: int | None, params: tuple[Param, ...] = (), **kw):
    """Register the decorated function as the kernel of primitive `name`."""

    def register(kernel: Callable) -> Callable:
        if name in OPS:
            raise ValueError(f"op {name!r} registered twice")
        OPS[name] = OpDef(name, inputs, tuple(params), kernel, doc=(kernel.__doc__ or "").strip(), **kw)
        return kernel

    return register


def in_range(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False):
    """A parameter check: value in the interval, with the message the diagnostics print."""
    text = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"

    def check(v: float) -> str | None:
        ok = (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
        return None if ok else f"must be in {text}"

    return check


def non_negative_int(v: float) -> str | None:
    return None if v == int(v) and v >= 0 else "must be a non-negative integer"


# The `seed=` of every random op: mixed with the run's --seed into the op's mask key.
SEED = Param("seed", 0, kind="int", check=non_negative_int, doc="mask seed, mixed with the run's --seed")
