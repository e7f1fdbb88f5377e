"""The primitive registry: one entry per op — its name, inputs, parameters with their checks, and kernel.

A kernel receives a KernelContext, its tensor inputs (torch tensors, or Python floats for scalar
inputs) and its parameters as keyword arguments, and returns a tensor (or float). Elementwise
kernels may be called on any contiguous slice of the flattened tensors; `ctx.start` is the index of
the slice's first element, so random ops draw the same numbers whatever the slicing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

REQUIRED = object()


@dataclass(frozen=True)
class Param:
    name: str
    default: Any = REQUIRED
    kind: str = "number"  # number | int | bool
    check: Callable[[float], str | None] | None = None  # returns "must be in [0, 1)" or None
    doc: str = ""

    def convert(self, value: float) -> Any:
        if self.kind == "int":
            return int(value)
        if self.kind == "bool":
            return bool(value)
        return float(value)


@dataclass(frozen=True)
class OpDef:
    name: str
    inputs: int | None  # number of inputs; None: variadic (one or more, or a single list)
    params: tuple[Param, ...]
    kernel: Callable
    kind: str = "elementwise"  # elementwise | whole-tensor | cross-model (later)
    random: bool = False
    tensor_inputs: bool = False  # inputs must be tensors, not scalars
    doc: str = ""

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)


@dataclass
class KernelContext:
    """Where a kernel call sits: which tensor, which slice of it, and the keys of random ops."""

    tensor: str = ""
    start: int = 0
    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
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
