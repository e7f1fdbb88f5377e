"""Elementwise primitives: arithmetic, avg, sum, dare."""

from __future__ import annotations

from .. import rng
from . import native
from .fast import zero_unless
from .registry import SEED, KernelContext, Param, in_range, op


@op("add", 2)
def add(ctx: KernelContext, a, b):
    """a + b"""
    return a + b


@op("sub", 2)
def sub(ctx: KernelContext, a, b):
    """a - b"""
    return a - b


@op("mul", 2)
def mul(ctx: KernelContext, a, b):
    """a * b"""
    return a * b


@op("div", 2)
def div(ctx: KernelContext, a, b):
    """a / b"""
    return a / b


@op("neg", 1)
def neg(ctx: KernelContext, a):
    """-a"""
    return -a


def _sum(values):
    total = values[0]
    for v in values[1:]:
        total = total + v
    return total


@op("sum", None)
def sum_(ctx: KernelContext, *xs):
    """sum(x1, x2, ...) or sum([x1, x2, ...]): the elementwise sum, added left to right."""
    return _sum(xs)


@op("avg", None)
def avg(ctx: KernelContext, *xs):
    """avg(x1, x2, ...) or avg([x1, x2, ...]): the elementwise mean, (x1 + ... + xn) / n."""
    return _sum(xs) / len(xs)


@op(
    "dare",
    1,
    (
        Param("p", check=in_range(0, 1, hi_open=True), doc="drop probability"),
        SEED,
    ),
    random=True,
    tensor_inputs=True,
)
def dare(ctx: KernelContext, x, *, p: float, seed: int):
    """dare(x, p, seed=0): drop each entry with probability p and rescale the survivors by 1/(1-p)
    (Drop And REscale, Yu et al. 2023). The mask is a pure function of (run seed, tensor name,
    this expression's structure including `seed`, element index)."""
    if p == 0:
        return x
    scaled = x / (1.0 - p)
    kept = native.keep_random(scaled, ctx.key, ctx.start, 1.0 - p)
    if kept is not None:
        return kept
    keep = rng.keep_mask(ctx.key, ctx.start, x.numel(), 1.0 - p, device=x.device).view(x.shape)
    return zero_unless(keep, scaled)
