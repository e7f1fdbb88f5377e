"""The numba loops behind native.py (imported only when they are used: numba takes 0.2 s to import).
Each loop works on the uint32 bit patterns of float32 values; see native.py for what each replaces."""

from __future__ import annotations

import math

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from .. import rng

ABS = np.uint32(0x7FFFFFFF)
ZERO = np.uint32(0)

jit = numba.njit(nogil=True, cache=True, boundscheck=False, fastmath=False)


@intrinsic
def draw32(typingctx, index, k0, k1):
    """rng's draw (rng.keyed_draw) for the low 32 bits of an element's index under the round
    keys k0, k1 of its high bits, as uint32. Written in 32-bit LLVM integers: numba widens integer
    arithmetic to 64 bits, and a loop of 64-bit multiplies vectorizes half as wide (0.62 against
    0.34 ns per entry for a random mask)."""
    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)

        def low32(v):
            width = v.type.width
            return builder.trunc(v, i32) if width > 32 else builder.zext(v, i32) if width < 32 else v

        def const(v):
            return ir.Constant(i32, v)

        x, a, b = (low32(v) for v in args)
        x = builder.xor(x, a)
        x = builder.xor(x, builder.lshr(x, const(16)))
        x = builder.mul(x, const(rng.M1))
        x = builder.xor(x, builder.xor(builder.lshr(x, const(15)), b))
        x = builder.mul(x, const(rng.M2))
        return builder.xor(x, builder.lshr(x, const(16)))

    return types.uint32(index, k0, k1), codegen


@jit
def select_random(xbits, out, first, k0, k1, limit):
    """out[j] = xbits[j] where rng's draw for element index (high bits, first + j) is below limit,
    else 0 (+0.0). `first` is the low 32 bits of the first index; k0, k1 the round keys of the high
    bits, which every element shares."""
    for j in range(xbits.shape[0]):
        out[j] = xbits[j] if draw32(first + np.uint64(j), k0, k1) < limit else ZERO


@jit
def high_histogram(xbits, hist, shift):
    """hist[magnitude bits >> shift] += 1 for every entry."""
    for j in range(xbits.shape[0]):
        hist[(xbits[j] & ABS) >> shift] += 1


# A noting histogram's state (int64): the entries seen in its bracket of bins, the flat index of the
# next entry, and the lowest and highest bin of the bracket.
NOTED, NEXT, LOWEST, HIGHEST = 0, 1, 2, 3


@jit
def _noting(xbits, hist, state, positions, bits, shift, count_bins):
    """note_bracket, and high_histogram too where count_bins. One loop for both: noting inside the
    histogram's loop costs 0.12 ns per entry more than the histogram alone (0.8 ns), where a loop of
    its own costs 0.9 ns (neither vectorizes)."""
    lowest, width = np.uint32(state[LOWEST]), np.uint32(state[HIGHEST] - state[LOWEST])
    count, first, cap = state[NOTED], state[NEXT], positions.shape[0]
    for j in range(xbits.shape[0]):
        b = xbits[j] & ABS
        h = b >> shift
        if count_bins:
            hist[h] += 1
        if np.uint32(h - lowest) <= width:  # lowest <= bin <= highest
            if count < cap:
                positions[count] = first + j
                bits[count] = b
            count += 1
    state[NOTED] = count
    state[NEXT] = first + xbits.shape[0]


@jit
def note_bracket(xbits, state, positions, bits, shift):
    """For each entry whose bin (magnitude bits >> shift) lies in the bracket of `state`: its flat
    index (state[NEXT] + j) and magnitude bits written at positions[state[NOTED]], bits[state[NOTED]]
    while they have room. state[NOTED] counts them all; state[NEXT] moves past xbits."""
    _noting(xbits, state, state, positions, bits, shift, False)  # no histogram: `state` stands in


@jit
def high_histogram_noting(xbits, hist, state, positions, bits, shift):
    """high_histogram and note_bracket over the same entries, in one loop."""
    _noting(xbits, hist, state, positions, bits, shift, True)


@jit
def low_histogram_positions(xbits, hist, high, shift, low_mask, first, positions, bits, count):
    """hist[magnitude bits & low_mask] += 1 for the entries whose magnitude bits >> shift are `high`,
    and the flat index (first + j) and magnitude bits of each of them written at positions[count],
    bits[count] onwards while they have room. Returns count + the entries counted."""
    cap = positions.shape[0]
    for j in range(xbits.shape[0]):
        b = xbits[j] & ABS
        if (b >> shift) == high:
            hist[b & low_mask] += 1
            if count < cap:
                positions[count] = first + j
                bits[count] = b
            count += 1
    return count


@jit
def noted_low_histogram(bits, count, high, shift, low_mask, hist):
    """hist[b & low_mask] += 1 for each of the first `count` noted magnitude bits b whose bin
    (b >> shift) is `high`; returns how many there are."""
    k = 0
    for j in range(count):
        b = bits[j]
        if (b >> shift) == high:
            hist[b & low_mask] += 1
            k += 1
    return k


@jit
def nth_noted(bits, positions, count, target, n):
    """positions[j] of the n-th j < count (1-based) whose noted magnitude bits are `target`, or -1."""
    for j in range(count):
        if bits[j] == target:
            n -= 1
            if n == 0:
                return positions[j]
    return -1


@jit
def keep_at_least(xbits, out, t):
    """out[j] = xbits[j] where its magnitude bits are >= t, else 0 (+0.0)."""
    for j in range(xbits.shape[0]):
        out[j] = xbits[j] if (xbits[j] & ABS) >= t else ZERO


F_ZERO, F_ONE = np.float32(0.0), np.float32(1.0)
BLOCK = 2048  # entries per block of disjoint_merge: its inputs' blocks and scratch stay in L1


@jit
def _weighted_sign(x, w, out, add):
    """out (+)= torch.sign(x * w)."""
    for j in range(out.shape[0]):
        d = x[j] * w
        s = np.float32(d > F_ZERO) - np.float32(d < F_ZERO)
        out[j] = out[j] + s if add else s


@jit
def _weighted(x, w, out, add):
    """out (+)= x * w."""
    for j in range(out.shape[0]):
        d = x[j] * w
        out[j] = out[j] + d if add else d


@jit
def _agreeing(x, w, elected, total, divisor, add):
    """total (+)= x * w where its sign is the elected one, else +0.0; divisor (+)= w there, else +0.0."""
    for j in range(total.shape[0]):
        d = x[j] * w
        e = elected[j]
        agree = ((d > F_ZERO) & (e > F_ZERO)) | ((d < F_ZERO) & (e < F_ZERO))  # torch.sign(d) == e
        term = d if agree else F_ZERO
        share = w if agree else F_ZERO
        total[j] = total[j] + term if add else term
        divisor[j] = divisor[j] + share if add else share


@jit
def disjoint_merge(xs, ws, out, normalize, by_count):
    """consensus.disjoint_merge entry by entry, in its order of float32 operations; xs a tuple of
    arrays, ws their float32 weights. Block by block, one simple loop per input and step, free of
    branches, so that the compiler vectorizes it (a loop over the inputs per entry mispredicts on
    every sign)."""
    elected = np.empty(BLOCK, np.float32)
    divisor = np.empty(BLOCK, np.float32)
    for a in range(0, out.shape[0], BLOCK):
        b = min(a + BLOCK, out.shape[0])
        e, dv, o = elected[:b - a], divisor[:b - a], out[a:b]
        for i in range(len(xs)):  # the score: the sum of the weighted values, or of their signs
            if by_count:
                _weighted_sign(xs[i][a:b], ws[i], e, i > 0)
            else:
                _weighted(xs[i][a:b], ws[i], e, i > 0)
        for j in range(b - a):
            e[j] = F_ONE if e[j] >= F_ZERO else -F_ONE
        for i in range(len(xs)):
            _agreeing(xs[i][a:b], ws[i], e, o, dv, i > 0)
        if normalize:
            for j in range(b - a):
                o[j] = o[j] / (dv[j] + (F_ONE if dv[j] == F_ZERO else F_ZERO))


@jit
def nth_equal(xbits, t, n):
    """(j, n) for the n-th entry (1-based) whose magnitude bits are t, or (-1, how many there are)."""
    count = 0
    for j in range(xbits.shape[0]):
        if (xbits[j] & ABS) == t:
            count += 1
            if count == n:
                return j, count
    return -1, count



MANTISSA, HIDDEN = np.uint32(0x7FFFFF), np.uint32(0x800000)


SPECIAL = np.uint32(255)  # the exponent field of infinities and NaNs
INF_BITS = np.uint32(0x7F800000)
WINDOW = 18  # exponent fields below a block's largest that abs_sum_bins adds up in float64
SUM_BLOCK = 2048  # entries per such block: 2^11 magnitudes below 2^42 units each sum below 2^53
LOW_MASK = np.int64((1 << WINDOW) - 1)


@jit
def _bin_entries(xbits, bins, flags, below):
    """bins[j % 4, exponent field of x_j] += its significand (with the hidden bit where the field
    is not 0), for the entries whose field is below `below` (256: all); flags[0] = 1 when they
    hold a NaN, flags[1] = 1 when an infinity. One store per entry and no branch (a second store
    site made the loop twenty times slower, a branch on the field three times): the specials are
    looked for only when the bins of the field 255 grew."""
    before = bins[0, SPECIAL] + bins[1, SPECIAL] + bins[2, SPECIAL] + bins[3, SPECIAL]
    for j in range(xbits.shape[0]):
        b = xbits[j] & ABS
        e = b >> np.uint32(23)
        significand = np.int64((b & MANTISSA) | (HIDDEN if e != ZERO else ZERO))
        bins[j & 3, e] += significand if e < below else 0
    if bins[0, SPECIAL] + bins[1, SPECIAL] + bins[2, SPECIAL] + bins[3, SPECIAL] != before:
        for j in range(xbits.shape[0]):
            b = xbits[j] & ABS
            if b > INF_BITS:
                flags[0] = 1
            elif b == INF_BITS:
                flags[1] = 1


@numba.njit(nogil=True, cache=True, boundscheck=False, fastmath={"reassoc"})
def _window_sum(xbits, low):
    """(Σ |x_j| in float64 over the entries whose exponent field is at least `low`, how many nonzero
    entries have a lower one). Exact whatever the order of the additions (so it may be vectorized):
    see abs_sum_bins."""
    least = np.uint32(np.uint32(low) << np.uint32(23))  # the smallest magnitude bits in the window
    total = 0.0
    below = 0
    for j in range(xbits.shape[0]):
        b = np.uint32(xbits[j] & ABS)
        inside = b >= least
        total += np.float64(b.view(np.float32)) if inside else 0.0
        below += 1 if (not inside) and b != ZERO else 0
    return total, below


@jit
def abs_sum_bins(xbits, bins, flags):
    """bins[·, e] += the significands (with the hidden bit where e is not 0) of the entries whose
    exponent field is e, in units of 2^(max(e, 1) - 150), and flags[0] = 1 for a NaN, flags[1] = 1
    for an infinity: abs_sum.AbsSum's exact sum.

    Block by block: the entries within WINDOW fields of the block's largest are multiples of its
    unit 2^(low - 150) below 2^42 units, so their float64 sum is an exact integer k < 2^53 of units
    in any order (a vectorized loop); k goes into the bins of `low` and `low + WINDOW` (2^WINDOW
    units of `low` each), below 2^35 per block. The smaller nonzero entries, rare, and blocks
    holding specials or only tiny values take the entry-by-entry loop."""
    n = xbits.shape[0]
    for a in range(0, n, SUM_BLOCK):
        block = xbits[a:min(n, a + SUM_BLOCK)]
        top = ZERO
        for j in range(block.shape[0]):
            top = max(top, np.uint32(block[j] & ABS))
        high = np.uint32(top >> np.uint32(23))
        if high == SPECIAL or high <= WINDOW:
            _bin_entries(block, bins, flags, np.uint32(256))
            continue
        low = np.uint32(high - np.uint32(WINDOW))
        total, below = _window_sum(block, low)
        k = np.int64(math.ldexp(total, 150 - np.int64(low)))
        bins[0, low] += k & LOW_MASK
        bins[0, high] += k >> np.int64(WINDOW)
        if below:
            _bin_entries(block, bins, flags, low)
