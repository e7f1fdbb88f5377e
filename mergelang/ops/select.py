"""Order statistics of |x| over a whole tensor, streamed: an exact radix select on the float bits.

For non-negative floats the IEEE-754 bit pattern, read as an integer, orders like the value.
|x| in float32 has the sign bit clear, so its pattern is a 31-bit integer. The value at a
given rank is found in two passes over the chunks:

1. a histogram (torch.bincount) of the top 16 of those 31 bits locates the bin that holds
   the rank, and how many larger values lie above it;
2. a histogram of the low 15 bits of the values in that bin locates the exact pattern.

The answer is the element of that rank, bit for bit: the value `torch.kthvalue` returns for
the matching ascending rank. Memory is two fixed histograms; work is O(n). The largest and
smallest magnitude (ranks 1 and n) take a single pass. -0.0 and +0.0 are the same magnitude;
a NaN counts as larger than +inf.

A threshold keeps ties: `|x| >= topk_threshold(x, density)` keeps the top k entries *and* every
entry equal in magnitude to the k-th, so it may keep a few more than k where magnitudes repeat
(mergekit keeps exactly k, choosing among equal magnitudes by the order of an unstable sort).
"""

from __future__ import annotations

import math

import torch

from .registry import KernelContext, Param, in_range, op

HIGH_BITS = 16  # bins of the first pass: 2**16
LOW_BITS = 15  # bins of the second pass: 2**15 (31 magnitude bits in all)
_LOW_MASK = (1 << LOW_BITS) - 1
_INF = float("inf")


def _magnitude_bits(x: torch.Tensor) -> torch.Tensor:
    """The bit patterns of |x| in float32 as non-negative int64 (monotone in |x|)."""
    return x.reshape(-1).to(torch.float32).abs().view(torch.int32).to(torch.int64)


def _pick(hist: torch.Tensor, rank: int) -> tuple[int, int]:
    """The bin that holds the `rank`-th largest value (1-based) of a histogram, and the rank
    that value has within its bin."""
    from_top = hist.flip(0).cumsum(0)
    j = int(torch.searchsorted(from_top, torch.tensor([rank], dtype=from_top.dtype, device=from_top.device)).item())
    b = hist.numel() - 1 - j
    before = int(from_top[j].item()) - int(hist[b].item())
    return b, rank - before


class MagnitudeRank:
    """The magnitude of descending rank `rank` (1 = the largest |x|) among the n entries of a
    tensor, streamed over its chunks: the reducer both primitives below are made of.

    `rank` may be None (the subclass's answer needs no data: `fixed` is returned after one pass).
    """

    def __init__(self, ctx: KernelContext, shape: tuple[int, ...], rank: int | None = None,
                 fixed: float = 0.0):
        self.device = ctx.device
        self.n = math.prod(shape)
        self.rank = rank
        self.fixed = fixed
        self.value: float | None = None
        self.hist = torch.zeros(1 << HIGH_BITS, dtype=torch.int64, device=self.device)
        self.high = 0
        self.rank_in_bin = 0
        self.largest = -1  # bit patterns, for ranks 1 and n
        self.smallest = 1 << 31

    def _needs_histogram(self) -> bool:
        return self.rank is not None and 1 < self.rank < self.n

    def update(self, pass_: int, x: torch.Tensor) -> None:
        if self.rank is None or x.numel() == 0:
            return
        bits = _magnitude_bits(x)
        if pass_ == 0:
            if self._needs_histogram():
                self.hist += torch.bincount(bits >> LOW_BITS, minlength=1 << HIGH_BITS)
            else:
                self.largest = max(self.largest, int(bits.max().item()))
                self.smallest = min(self.smallest, int(bits.min().item()))
        else:
            in_bin = bits[(bits >> LOW_BITS) == self.high]
            self.hist += torch.bincount(in_bin & _LOW_MASK, minlength=1 << LOW_BITS)

    def end_pass(self, pass_: int) -> bool:
        if self.rank is None or self.n == 0:
            self.value = self.fixed if self.rank is None else 0.0
            return True
        if not self._needs_histogram():
            self.value = _bits_to_float(self.largest if self.rank == 1 else self.smallest)
            return True
        if pass_ == 0:
            self.high, self.rank_in_bin = _pick(self.hist, self.rank)
            self.hist = torch.zeros(1 << LOW_BITS, dtype=torch.int64, device=self.device)
            return False
        low, _ = _pick(self.hist, self.rank_in_bin)
        self.value = _bits_to_float((self.high << LOW_BITS) | low)
        return True

    def result(self) -> torch.Tensor:
        return torch.tensor(self.value, dtype=torch.float32, device=self.device)


def _bits_to_float(bits: int) -> float:
    return torch.tensor([bits], dtype=torch.int32).view(torch.float32).item()


def kth_largest_magnitude(x: torch.Tensor, rank: int, chunk: int | None = None) -> torch.Tensor:
    """The `rank`-th largest |x| (1-based) of a whole tensor, by the streaming radix select
    (fed in chunks of `chunk` elements when given). For tests and direct use."""
    flat = x.reshape(-1)
    reducer = MagnitudeRank(KernelContext(device=x.device), (flat.numel(),), rank)
    step = chunk or max(1, flat.numel())
    pass_ = 0
    while True:
        for s in range(0, flat.numel(), step):
            reducer.update(pass_, flat[s:s + step])
        if reducer.end_pass(pass_):
            return reducer.result()
        pass_ += 1


def topk_rank(n: int, density: float) -> int:
    """How many entries `topk_threshold` keeps at least: mergekit's max(1, int(density * n))."""
    return n if density >= 1 else max(1, int(density * n))


def band_ranks(n: int, density: float, gamma: float) -> tuple[int, int]:
    """(skipped, kept) for `band_threshold`: the largest `skipped` magnitudes are cut as outliers
    and the next `kept` are kept, as mergekit's magnitude_outliers: kept = int(density * n),
    skipped = min(int(gamma * n), n - kept); density >= 1 keeps everything."""
    if density >= 1:
        return 0, n
    kept = int(density * n)
    return min(int(gamma * n), n - kept), kept


@op(
    "topk_threshold",
    1,
    (Param("density", check=in_range(0, 1, lo_open=True), doc="fraction of entries to keep"),),
    kind="reduce",
    tensor_inputs=True,
)
class TopkThreshold(MagnitudeRank):
    """topk_threshold(x, density): the k-th largest |x| over the whole tensor, k = max(1, ⌊density·n⌋)
    (n = number of entries; the rounding is mergekit's). `|x| >= topk_threshold(x, density)` keeps the
    top k magnitudes and every entry tied with the k-th. density = 1 gives the smallest |x| (keeps all)."""

    def __init__(self, ctx: KernelContext, shape: tuple[int, ...], *, density: float):
        n = math.prod(shape)
        super().__init__(ctx, shape, topk_rank(n, density))


@op(
    "band_threshold",
    1,
    (
        Param("density", check=in_range(0, 1, lo_open=True), doc="fraction of entries to keep"),
        Param("gamma", 0.01, check=in_range(0, 1), doc="fraction of the largest magnitudes cut as outliers"),
        Param("bound", "lower", kind="choice", choices=("lower", "upper"), doc="which end of the band"),
    ),
    kind="reduce",
    tensor_inputs=True,
)
class BandThreshold(MagnitudeRank):
    """band_threshold(x, density, gamma=0.01, bound="lower"|"upper"): the ends of the magnitude band
    that Model Breadcrumbs keeps. With n entries, k = ⌊density·n⌋ and g = min(⌊gamma·n⌋, n − k)
    (mergekit's magnitude_outliers): the g largest magnitudes are cut and the next k kept, i.e.
    descending ranks g+1 … g+k. bound="lower" is the magnitude at rank g+k (+inf when k = 0:
    nothing is kept); bound="upper" is the magnitude at rank g+1 (+inf when g = 0: no outlier cut).
    density = 1 keeps everything (lower = the smallest |x|, upper = +inf), whatever gamma.
    `keep_band(x, lower, upper)` then keeps the band and every entry tied with either end."""

    def __init__(self, ctx: KernelContext, shape: tuple[int, ...], *, density: float, gamma: float, bound: str):
        n = math.prod(shape)
        skipped, kept = band_ranks(n, density, gamma)
        if kept == 0:
            super().__init__(ctx, shape, None, fixed=_INF)
        elif bound == "lower":
            super().__init__(ctx, shape, skipped + kept)
        elif skipped == 0:
            super().__init__(ctx, shape, None, fixed=_INF)
        else:
            super().__init__(ctx, shape, skipped + 1)
