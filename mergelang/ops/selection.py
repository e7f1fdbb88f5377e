"""Selection primitives: masks of the entries to keep, and the whole-tensor statistics they need.

Masks are float32 tensors of 0.0 and 1.0, so `x * mask` keeps an entry or turns it into a zero
of x's sign (as `x * bool_mask` does in torch). Comparisons follow torch: a Python number
compared with a float32 tensor is first rounded to float32.

- `abs`, `clamp`, `greater`, `greater_equal`, `where`: elementwise building blocks.
- `nonzero_mask(x, epsilon)`: the entries a delta changes (RAM).
- `variance(xs)`: the spread of several tensors, entry by entry (SCE).
- `nonzero_topk_cutoff(x, density)` with `top_mask(x, cutoff)`: exactly the top fraction of the
  *nonzero* entries by magnitude, ties to the lower index (SCE's selection). The cutoff is a rank
  key of select.py, like `topk_cutoff`'s (which counts all entries and keeps at least one).
- `quantile(x, q)`: an exact order statistic of the whole tensor (Arcee Fusion's threshold).
- `mean(x)`: the mean of the whole tensor (SCE's weights).
- `softmax_kl(x, y)`: the KL divergence between softmaxes along the last dim (Arcee Fusion).

Whole-tensor statistics are `reduce` ops that stream over chunks of rows. Order statistics are
exact (radix selects over the float bits), never taken from a sample.
"""

from __future__ import annotations

import math

from ..lazy import torch
from . import fast, select
from .registry import KernelContext, Param, in_range, op


def _is_number(v) -> bool:
    return isinstance(v, (int, float))


def _non_negative(v: float) -> str | None:
    return None if v >= 0 else "must be >= 0"


# ---- elementwise ---------------------------------------------------------------------------------


@op("abs", 1)
def abs_(ctx: KernelContext, x):
    """abs(x) = |x|"""
    return abs(x) if _is_number(x) else torch.abs(x)


@op("greater", 2)
def greater(ctx: KernelContext, x, y):
    """greater(x, y) = 1 where x > y, else 0"""
    if _is_number(x) and _is_number(y):
        return float(x > y)
    return (torch.gt(x, y) if torch.is_tensor(x) else torch.lt(y, x)).to(torch.float32)


@op("greater_equal", 2)
def greater_equal(ctx: KernelContext, x, y):
    """greater_equal(x, y) = 1 where x >= y, else 0"""
    if _is_number(x) and _is_number(y):
        return float(x >= y)
    return (torch.ge(x, y) if torch.is_tensor(x) else torch.le(y, x)).to(torch.float32)


@op("where", 3)
def where(ctx: KernelContext, cond, a, b):
    """where(cond, a, b) = a where cond != 0, else b. An entry of the branch not taken (even a NaN
    from 0/0) never reaches the result."""
    if _is_number(cond):
        return a if cond != 0 else b
    if _is_number(a) and _is_number(b):
        return fast.select(cond != 0, torch.tensor(float(a), dtype=torch.float32, device=cond.device),
                           torch.tensor(float(b), dtype=torch.float32, device=cond.device))
    return fast.select(cond != 0, a, b)


def _clamp_check(params: dict) -> list[tuple[str, str]]:
    return [("max", f"must be >= min ({params['min']:g})")] if params["max"] < params["min"] else []


@op(
    "clamp",
    1,
    (
        Param("min", -math.inf, doc="lower bound"),
        Param("max", math.inf, doc="upper bound"),
    ),
    check_all=_clamp_check,
)
def clamp(ctx: KernelContext, x, **bounds):
    """clamp(x, min=-inf, max=inf) = x limited to [min, max] (NaN stays NaN)."""
    lo, hi = bounds["min"], bounds["max"]
    if _is_number(x):
        return x if x != x else (lo if x < lo else (hi if x > hi else x))
    return torch.clamp(x, min=None if lo == -math.inf else lo, max=None if hi == math.inf else hi)


@op("nonzero_mask", 1, (Param("epsilon", 0.0, check=_non_negative, doc="entries with |x| <= epsilon count as zero"),))
def nonzero_mask(ctx: KernelContext, x, *, epsilon: float):
    """nonzero_mask(x, epsilon=0) = 1 where |x| > epsilon, else 0: the entries a delta changes."""
    if _is_number(x):
        return float(abs(x) > epsilon)
    return (torch.abs(x) > epsilon).to(torch.float32)


@op("variance", None)
def variance(ctx: KernelContext, *xs):
    """variance(x1, ..., xn) or variance([x1, ..., xn]): the population variance across the inputs,
    entry by entry: (1/n) Σ (x_i - mean)², computed as torch.var(stack, dim=0, unbiased=False)."""
    if all(_is_number(x) for x in xs):
        return torch.var(torch.tensor(xs, dtype=torch.float64), unbiased=False).item()
    device = next(x for x in xs if torch.is_tensor(x)).device
    tensors = torch.broadcast_tensors(*(torch.tensor(float(x), dtype=torch.float32, device=device)
                                        if _is_number(x) else x for x in xs))
    return torch.var(torch.stack(tensors), dim=0, unbiased=False)


@op("top_mask", 2, tensor_inputs=True)
def top_mask(ctx: KernelContext, x, cutoff):
    """top_mask(x, cutoff) = 1 where the entry's rank key (|x|, then the lower flat index first;
    see select.py) is >= cutoff, else 0: the mask of the entries `keep_top(x, cutoff)` keeps, to
    apply to other tensors. cutoff comes from nonzero_topk_cutoff or topk_cutoff on the same x."""
    return (select.rank_keys(x, ctx.start).view(x.shape) >= cutoff).to(torch.float32)


# ---- reductions ----------------------------------------------------------------------------------


@op("nonzero_topk_cutoff", 1, (Param("density", check=in_range(0, 1), doc="fraction of the nonzero entries kept"),),
    kind="reduce", tensor_inputs=True)
class NonzeroTopkCutoff(select.RankCutoff):
    """nonzero_topk_cutoff(x, density): the rank key of the k-th largest entry of x by magnitude,
    k = ⌊density · count_nonzero(x)⌋, so that `top_mask(x, cutoff)` keeps exactly the k largest
    (ties to the lower index): the top fraction of the nonzero entries, never a zero. k = 0 keeps
    nothing, and the mask keeps the shape of x (mergekit's SCE, before arcee-ai/mergekit#700, gave
    a mask with an extra leading axis there, which changed the rank of the merged tensor).
    density = 1 keeps every entry, zeros too (mergekit's SCE then applies no mask). The product
    density · count is rounded to float32 before ⌊⌋, as in mergekit's SCE."""

    def __init__(self, ctx: KernelContext, shape: tuple[int, ...], *, density: float):
        if density >= 1:
            super().__init__(ctx, shape, None, fixed=select.KEEP_ALL)
        elif density <= 0:
            super().__init__(ctx, shape, None, fixed=select.KEEP_NONE)
        else:
            super().__init__(ctx, shape, 1)  # the rank is set once the nonzero entries are counted
        self.density, self.nonzero = density, 0

    def update(self, pass_: int, x: torch.Tensor) -> None:
        if pass_ == 0 and self.rank is not None:
            self.nonzero += int(torch.count_nonzero(x))
        super().update(pass_, x)

    def end_pass(self, pass_: int) -> bool:
        if pass_ == 0 and self.rank is not None:
            k = int(torch.tensor(self.nonzero, dtype=torch.int64) * self.density)
            if k == 0:
                self.key = select.KEEP_NONE
                return True
            self.rank = k
        return super().end_pass(pass_)


def _ordered_keys(x: torch.Tensor) -> torch.Tensor:
    """float32 values as int64 keys in [0, 2^32) that order like the values (-0.0 just below +0.0)."""
    bits = x.reshape(-1).to(torch.float32).view(torch.int32).to(torch.int64)
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits) + (1 << 31)


def _key_value(key: int) -> torch.Tensor:
    """The float32 value (0-d) of a key of _ordered_keys."""
    bits = key - (1 << 31)
    return torch.tensor([bits ^ 0x7FFFFFFF if bits < 0 else bits], dtype=torch.int32).view(torch.float32)[0]


def _ascending_pick(hist: torch.Tensor, rank: int) -> tuple[int, int]:
    """The bin of a histogram that holds the entry of ascending 0-based `rank`, and its rank in the bin."""
    cum = torch.cumsum(hist, 0)
    b = int(torch.searchsorted(cum, torch.tensor([rank], device=cum.device), right=True).item())
    return b, rank - (int(cum[b - 1].item()) if b > 0 else 0)


@op("quantile", 1, (Param("q", check=in_range(0, 1), doc="quantile level"),), kind="reduce", tensor_inputs=True)
class Quantile:
    """quantile(x, q): the entry of ascending rank ⌊q · (n - 1)⌋ (0-based) among all n entries of x:
    the lower order statistic, not interpolated, as mergekit's Arcee Fusion takes its quartiles
    (q · (n - 1) rounded to float32 first, as there). Exact: a radix select over the ordered float
    bits, a histogram of the high 16 bits, then one of the low 16 bits within the chosen bin."""

    def __init__(self, ctx: KernelContext, shape, *, q: float):
        self.n = math.prod(shape)
        self.rank = int((torch.tensor([q], dtype=torch.float32) * max(self.n - 1, 0)).long()[0])
        self.device = ctx.device
        self.hist = torch.zeros(1 << 16, dtype=torch.int64, device=self.device)
        self.high = 0
        self.value = torch.tensor(math.nan, dtype=torch.float32)

    def update(self, pass_: int, x: torch.Tensor) -> None:
        keys = _ordered_keys(x)
        if pass_ == 1:
            keys = keys[(keys >> 16) == self.high] & 0xFFFF
        else:
            keys = keys >> 16
        self.hist += torch.bincount(keys, minlength=1 << 16)

    def end_pass(self, pass_: int) -> bool:
        if self.n == 0:
            return True
        if pass_ == 0:
            self.high, self.rank = _ascending_pick(self.hist, self.rank)
            self.hist.zero_()
            return False
        low, _ = _ascending_pick(self.hist, self.rank)
        self.value = _key_value((self.high << 16) | low)
        return True

    def result(self) -> torch.Tensor:
        return self.value.to(self.device)


@op("mean", 1, kind="reduce", tensor_inputs=True)
class Mean:
    """mean(x) = (1/n) Σ x over every entry of the tensor: a 0-d value, accumulated in float64."""

    def __init__(self, ctx: KernelContext, shape):
        self.n = math.prod(shape)
        self.acc = torch.zeros((), dtype=torch.float64, device=ctx.device)

    def update(self, pass_: int, x: torch.Tensor) -> None:
        self.acc += x.sum(dtype=torch.float64)

    def end_pass(self, pass_: int) -> bool:
        return True

    def result(self) -> torch.Tensor:
        return (self.acc / max(self.n, 1)).to(torch.float32)


def _kl_last_dim(x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    p = torch.softmax(x, dim=-1) + eps
    q = torch.softmax(y, dim=-1) + eps
    return torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)


@op("softmax_kl", 2, (Param("eps", 1e-8, check=_non_negative, doc="added to every probability"),),
    kind="reduce", tensor_inputs=True)
class SoftmaxKL:
    """softmax_kl(x, y, eps=1e-8) = Σ_j p_j log(p_j / q_j) along the last dim, with
    p = softmax(x) + eps and q = softmax(y) + eps: one value per last-dim vector (shape
    (..., 1), broadcasting against x). For a 1-d tensor that is one value for the whole tensor."""

    def __init__(self, ctx: KernelContext, shape, *, eps: float):
        self.eps = eps
        self.rowwise = len(shape) >= 2
        self.out = (torch.empty(tuple(shape[:-1]) + (1,), dtype=torch.float32, device=ctx.device)
                    if self.rowwise else None)
        self.row = 0
        self.parts: list[tuple[torch.Tensor, torch.Tensor]] = []

    def update(self, pass_: int, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.rowwise:
            self.out[self.row:self.row + x.shape[0]] = _kl_last_dim(x, y, self.eps)
            self.row += x.shape[0]
        else:
            self.parts.append((x.reshape(-1), y.reshape(-1)))

    def end_pass(self, pass_: int) -> bool:
        return True

    def result(self) -> torch.Tensor:
        if self.rowwise:
            return self.out
        x = torch.cat([a for a, _ in self.parts])
        y = torch.cat([b for _, b in self.parts])
        return _kl_last_dim(x, y, self.eps).reshape(())
