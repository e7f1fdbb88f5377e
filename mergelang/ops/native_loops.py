"""The numba loops behind native.py (imported only when they are used: numba takes 0.2 s to import).
Each loop works on the uint32 bit patterns of float32 values; see native.py for what each replaces."""

from __future__ import annotations

import numba
import numpy as np

from .. import rng

M1, M2, MASK32 = np.uint64(rng.M1), np.uint64(rng.M2), np.uint64(0xFFFFFFFF)
ABS = np.uint32(0x7FFFFFFF)
ZERO = np.uint32(0)
SIXTEEN, FIFTEEN = np.uint64(16), np.uint64(15)

jit = numba.njit(nogil=True, cache=True, boundscheck=False, fastmath=False)


@jit
def select_random(xbits, out, first, k0, k1, limit):
    """out[j] = xbits[j] where rng's draw for element index (high bits, first + j) is below limit,
    else 0 (+0.0). `first` is the low 32 bits of the first index; k0, k1 the round keys of the high
    bits, which every element shares."""
    for j in range(xbits.shape[0]):
        x = ((first + np.uint64(j)) & MASK32) ^ k0
        x ^= x >> SIXTEEN
        x = (x * M1) & MASK32
        x ^= (x >> FIFTEEN) ^ k1
        x = (x * M2) & MASK32
        x ^= x >> SIXTEEN
        out[j] = xbits[j] if x < limit else ZERO


@jit
def high_histogram(xbits, hist, shift):
    """hist[magnitude bits >> shift] += 1 for every entry."""
    for j in range(xbits.shape[0]):
        hist[(xbits[j] & ABS) >> shift] += 1


@jit
def low_histogram_positions(xbits, hist, high, shift, low_mask, first, positions, lows, count):
    """hist[magnitude bits & low_mask] += 1 for the entries whose magnitude bits >> shift are `high`,
    and the flat index (first + j) and low bits of each of them written at positions[count],
    lows[count] onwards while they have room. Returns count + the entries counted."""
    cap = positions.shape[0]
    for j in range(xbits.shape[0]):
        b = xbits[j] & ABS
        if (b >> shift) == high:
            low = b & low_mask
            hist[low] += 1
            if count < cap:
                positions[count] = first + j
                lows[count] = low
            count += 1
    return count


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


@jit
def abs_sum_bins(xbits, bins):
    """bins[j % 4, exponent field of x_j] += its significand (with the hidden bit where the field
    is not 0). One store per entry and no branch: a second store site for infinities and NaNs made
    the loop twenty times slower; abs_sum.py looks at those apart."""
    for j in range(xbits.shape[0]):
        b = xbits[j] & ABS
        e = b >> np.uint32(23)
        bins[j & 3, e] += np.int64((b & MANTISSA) | (HIDDEN if e != ZERO else ZERO))
