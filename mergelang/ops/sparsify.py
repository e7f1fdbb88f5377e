"""Sparsification primitives: keep some entries of a (task-vector) tensor, zero the rest.

The keep rules are mergekit's (sparsify.py): by magnitude (`keep_top` with a `topk_cutoff`), by
a magnitude band without the outliers (`keep_band` with two `band_cutoff`s), at random
(`keep_random`), or at random with rank-dependent probabilities (`magprune`, DELLA). None of them rescales; `l1_ratio` gives mergekit's L1-norm-matching factor,
and `ifelse` lets a method's boolean `rescale` choose between the two.

Random masks are a pure function of (run seed, tensor name, the op's structural key, element
index) — see rng.py — compared against a keep probability exact to 2^-32: it is never rounded to
the tensor's dtype (mergekit draws its mask with torch.bernoulli in the tensor's dtype, so in
bf16 a density of 0.9 becomes 0.8984375).
"""

from __future__ import annotations

import math

import numpy as np

from .. import rng
from ..arrays import device_type
from ..lazy import torch
from . import native, select  # select also registers topk_cutoff and band_cutoff
from .abs_sum import AbsSum
from .fast import zero_unless
from .registry import SEED, KernelContext, Param, in_range, op

EPS_NORM = 1e-7  # mergekit's tolerance for "the norm is zero" when rescaling
MAGPRUNE_BLOCK = 1 << 20  # elements per block when ranking rows


@op("keep_top", 2, tensor_inputs=True)
def keep_top(ctx: KernelContext, x, cutoff):
    """keep_top(x, cutoff): x where the entry's rank key (magnitude, then lower index first; see
    select.py) is >= cutoff, else 0. With cutoff = topk_cutoff(x, density) this is TIES's trim:
    exactly the k largest magnitudes."""
    kept = select.keep_top_values(x, ctx.start, int(cutoff))
    if kept is not None:
        return kept
    keep = select.keep_mask(x, ctx.start, int(cutoff), "lower").view(x.shape)
    return zero_unless(keep, x)


@op("keep_at_least", 2, tensor_inputs=True)
def keep_at_least(ctx: KernelContext, x, threshold):
    """keep_at_least(x, t): x where |x| >= t, else 0 (every entry equal to t kept). With t from
    model_magnitude_threshold this is the TIES paper's whole-model trim."""
    return zero_unless(x.abs() >= threshold, x)


@op("keep_band", 3, tensor_inputs=True)
def keep_band(ctx: KernelContext, x, lower, upper):
    """keep_band(x, lower, upper): x where lower <= rank key <= upper, else 0. With the two ends from
    band_cutoff this is Model Breadcrumbs' sparsification: outliers and small entries dropped."""
    keep = select.keep_mask(x, ctx.start, int(lower), "lower") & select.keep_mask(x, ctx.start, int(upper), "upper")
    return zero_unless(keep.view(x.shape), x)


@op(
    "keep_random",
    1,
    (
        Param("density", check=in_range(0, 1, lo_open=True), doc="probability of keeping each entry"),
        SEED,
    ),
    random=True,
    tensor_inputs=True,
)
def keep_random(ctx: KernelContext, x, *, density: float, seed: int):
    """keep_random(x, density, seed=0): keep each entry with probability density, zero the rest; no
    rescaling (mergekit's `random` sparsification, the mask of its dare_* methods). `dare(x, p)` is the
    DARE paper's form, which rescales the survivors by 1/(1-p)."""
    if density >= 1:
        return x
    kept = native.keep_random(x, ctx.key, ctx.start, density)
    if kept is not None:
        return kept
    keep = rng.keep_mask(ctx.key, ctx.start, x.numel(), density, device=x.device).view(x.shape)
    return zero_unless(keep, x)


def magprune_probabilities(magnitudes: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """Keep probabilities of DELLA's MagPrune for magnitudes ranked along dim 1: the entry of rank r
    among m (0 = the smallest; of equal magnitudes the lower index ranks higher, as in select.py)
    gets p = (density - epsilon) + 2·epsilon·r/(m - 1), from density - epsilon for the smallest to
    density + epsilon for the largest (in float32, in mergekit's order of operations). A row of one
    entry gets p = density."""
    m = magnitudes.shape[1]
    order = torch.argsort(magnitudes, dim=1, descending=True, stable=True)
    positions = torch.arange(m - 1, -1, -1, dtype=torch.float32, device=magnitudes.device)
    positions = positions.view((1, m) + (1,) * (magnitudes.dim() - 2)).expand(order.shape)
    ranks = torch.empty(order.shape, dtype=torch.float32, device=magnitudes.device).scatter_(1, order, positions)
    if m > 1:
        scaled = (ranks / torch.tensor(float(m - 1), dtype=torch.float32, device=ranks.device)).clamp(0, 1)
    else:
        scaled = torch.full_like(ranks, 0.5)
    return (scaled * 2) * epsilon + (density - epsilon)


def _limits(p: torch.Tensor) -> torch.Tensor:
    """rng.threshold for a tensor of keep probabilities: a draw below the limit keeps the entry."""
    scale = float(1 << rng.DRAW_BITS)
    return (p.to(torch.float64) * scale).round().clamp(0, scale).to(torch.int64)


def _magprune_check(params: dict) -> list[tuple[str, str]]:
    density, epsilon = params["density"], params["epsilon"]
    if density >= 1:
        return []  # everything is kept; epsilon is unused
    if density - epsilon <= 0:
        return [("epsilon", f"must be below density = {density:g} (the smallest keep probability "
                            f"is density - epsilon, which must be > 0)")]
    if density + epsilon > 1 + 1e-12:
        return [("epsilon", f"must be at most 1 - density = {1 - density:g} (the largest keep "
                            f"probability is density + epsilon, which must be <= 1)")]
    return []


@op(
    "magprune",
    1,
    (
        Param("density", check=in_range(0, 1, lo_open=True), doc="mean probability of keeping an entry"),
        Param("epsilon", 0.15, check=in_range(0, 1, hi_open=True), doc="spread of the keep probabilities"),
        SEED,
    ),
    kind="tensor",
    random=True,
    tensor_inputs=True,
    check_all=_magprune_check,
)
def magprune(ctx: KernelContext, x, *, density: float, epsilon: float, seed: int):
    """magprune(x, density, epsilon=0.15, seed=0): DELLA's MagPrune (Deep et al. 2024) without rescaling.
    Within each row (dim 1 of a matrix; the whole of a vector) entries are ranked by magnitude and kept
    with probability (density - epsilon) + 2·epsilon·rank/(m - 1): larger entries are likelier to stay.
    density = 1 keeps everything. Of equal magnitudes the lower index ranks higher (mergekit's unstable
    sort ranks them arbitrarily); a row of one entry is kept with probability density (mergekit: NaN)."""
    if density >= 1:
        return x
    shape = x.shape
    rows = x.reshape(1, -1) if x.dim() < 2 else x
    out = torch.empty_like(rows)
    row_size = math.prod(rows.shape[1:])
    step = max(1, MAGPRUNE_BLOCK // max(1, row_size))
    for r0 in range(0, rows.shape[0], step):
        block = rows[r0:r0 + step]
        p = magprune_probabilities(block.abs(), density, epsilon)
        limits = _limits(p)
        draws = rng.draws(ctx.key, r0 * row_size, block.numel(), device=block.device).view(block.shape)
        out[r0:r0 + step] = zero_unless(draws < limits, block)
    return out.view(shape)


@op("l1_ratio", 2, kind="reduce", tensor_inputs=True)
class L1Ratio:
    """l1_ratio(x, y): ‖x‖₁ / ‖y‖₁ over the whole tensor, or 1 when either norm is below 1e-7. Each
    norm is the exact sum rounded once to float64 (abs_sum.py: the same for any chunking and device),
    their ratio is taken in float64 and rounded to float32. `y * l1_ratio(x, y)` is mergekit's
    `rescale`: the sparsified y scaled back to the L1 norm of the dense x."""

    def __init__(self, ctx: KernelContext, shape: tuple[int, ...]):
        self.device = ctx.device
        self.num, self.den = AbsSum(), AbsSum()

    def update(self, pass_: int, x: torch.Tensor, y: torch.Tensor) -> None:
        self.num.add(x)
        self.den.add(y)

    def taps(self, pass_: int) -> list:
        return [self.num.tap(), self.den.tap()]

    def end_pass(self, pass_: int) -> bool:
        return True

    def result(self):
        """The ratio, a 0-d float32: a numpy array on the CPU (arrays.py), else a tensor on the device."""
        num, den = self.num.value(), self.den.value()
        ratio = 1.0 if num < EPS_NORM or den < EPS_NORM else num / den
        if device_type(self.device) == "cpu":
            return np.array(ratio, dtype=np.float32)
        return torch.tensor(ratio, dtype=torch.float32, device=self.device)


@op("ifelse", 2, (Param("cond", kind="bool", doc="which value to take"),))
def ifelse(ctx: KernelContext, a, b, *, cond: bool):
    """ifelse(a, b, cond): a when cond is true, else b. cond is a constant (a boolean parameter of a
    method, such as `rescale`), so the choice is made once per tensor, not per entry."""
    return a if cond else b
