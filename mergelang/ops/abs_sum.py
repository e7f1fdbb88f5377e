"""Σ|x| over a tensor's chunks, exact: the same float64 whatever the chunking, order or device.

A float32 magnitude is an integer significand times a power of two fixed by its exponent field. The
significands are added as integers, one int64 bin per exponent field (never overflowing: 2^24 per
entry, up to 2^39 entries per bin), and the result is their exact sum rounded once to float64. So a
sum does not depend on how a tensor is cut into chunks or in which order the entries are added, as
a float sum does (torch's vectorized sum order depends on the CPU's vector width). An infinity makes
the sum +inf and a NaN makes it NaN, as in a float sum.

On CPU float32 chunks of at least native.MIN_ELEMENTS entries a numba loop fills the bins: block
by block, it adds the entries within 18 binades of the block's largest in float64, exactly, and
bins only the rest one by one (0.36 ns per entry in the L1 cache here, against 0.95 ns binning
every entry and 1.1 ns for torch's `abs().sum(dtype=float64)`). A native region's loop may add
the values it computes to a sum without writing them out (`tap`). Elsewhere torch's bincount
fills the bins, with float64 weights that stay exact integers below 2^53.
"""

from __future__ import annotations

import math

import numpy as np

from ..arrays import to_torch
from ..lazy import torch
from . import native

EXPONENTS = 256
SPECIAL = EXPONENTS - 1  # the exponent field of infinities and NaNs
_EXACT_WEIGHTS = 1 << 29  # entries per bincount: 2^29 significands below 2^24 sum below 2^53


class AbsSum:
    def __init__(self):
        # numpy arrays, on the CPU whatever the device: a loop fills them without torch (arrays.py)
        self.bins = np.zeros((native.ABS_SUM_LANES, EXPONENTS), dtype=np.int64)
        self.flags = np.zeros(2, dtype=np.int64)  # a NaN seen, an infinity seen

    def add(self, x: torch.Tensor) -> None:
        """Add Σ|x| of a float32 chunk (a tensor of any shape and device)."""
        if native.abs_sum_bins(x, self.bins, self.flags):
            return
        bits = to_torch(x).reshape(-1).to(torch.float32).view(torch.int32) & 0x7FFFFFFF
        for part in bits.split(_EXACT_WEIGHTS):
            exponent = part >> 23
            significand = (part & 0x7FFFFF) | ((exponent != 0).to(torch.int32) << 23)
            sums = torch.bincount(exponent, weights=significand.to(torch.float64), minlength=EXPONENTS)
            self.bins[0] += sums.to(torch.int64).cpu().numpy()
            self.flags[0] |= int((part > 0x7F800000).any())
            self.flags[1] |= int((part == 0x7F800000).any())

    def tap(self) -> tuple[str, tuple[torch.Tensor, ...], tuple[int, ...]]:
        """(loop, arrays, constants) for a native region that adds the values it computes to this
        sum (native_regions.TAP_LOOPS)."""
        return "abs_sum_bins", (self.bins, self.flags), ()

    def value(self) -> float:
        """The sum, rounded once to float64."""
        nan, inf = self.flags.tolist()
        if nan:
            return math.nan
        if inf:
            return math.inf
        total = self.bins.sum(0).tolist()
        exact = sum(count << max(e - 1, 0) for e, count in enumerate(total[:SPECIAL]) if count)
        return math.ldexp(float(exact), -149)  # entry = significand · 2^(max(e, 1) - 150)
