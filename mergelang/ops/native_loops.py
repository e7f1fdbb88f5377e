"""The numba loops behind native.py (imported only when they are used: numba takes 0.2 s to import).
Each loop works on the uint32 bit patterns of float32 values; see native.py for what each replaces."""

from __future__ import annotations

import math

import numba
import numpy as np
from llvmlite import binding as llvm
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from .. import rng
from .select import ABOVE, BRACKETED, HIGHEST, LOWEST, NEXT, NOTED  # the first pass's state (int64)

ABS = np.uint32(0x7FFFFFFF)
ZERO = np.uint32(0)
ONE = np.uint32(1)

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


@jit
def _bracket_bounds(state, shift):
    """The bracket of `state` as magnitude bits: its least, its span (the greatest is least + span,
    below 2**31)."""
    least = np.uint32(state[LOWEST] << shift)
    return least, np.uint32(((state[HIGHEST] + 1) << shift) - 1) - least


@jit
def _count_noting_from(xbits, j, state, positions, bits, shift, count, above):
    """count_noting for entries j onwards, one at a time; returns (count, above) advanced."""
    least, span = _bracket_bounds(state, shift)
    first, cap = state[NEXT], positions.shape[0]
    for k in range(j, xbits.shape[0]):
        b = xbits[k] & ABS
        above += b > least + span
        if np.uint32(b - least) <= span:
            if count < cap:
                positions[count] = first + k
                bits[count] = b
            count += 1
    return count, above


@jit
def _count_noting_scalar(xbits, state, positions, bits, shift):
    count, above = _count_noting_from(xbits, 0, state, positions, bits, shift, state[NOTED], state[ABOVE])
    state[NOTED], state[ABOVE] = count, above
    state[NEXT] += xbits.shape[0]


@intrinsic
def _note16(typingctx, xbits, j, least, span, positions, bits, count, first):
    """For entries j .. j + 15 of xbits, with magnitude bits b: those in the bracket (b - least <= span,
    unsigned) written, compressed, at positions[count:] (flat index first + j + lane) and
    bits[count:] (b); (how many are in the bracket, how many above it). Both buffers must have room
    for 16 more. Vector code: the lanes' comparisons are masks, and only a group that holds an entry
    of the bracket (about one in seven on the benchmark's deltas) compresses and stores. The arrays
    must be contiguous (uint32 entries, int64 notes)."""
    if not all(isinstance(a, types.Array) and a.layout == "C" and a.ndim == 1 for a in (xbits, positions, bits)):
        return None  # no such loop for strided arrays: numba reports the call as unsupported
    signature = types.UniTuple(types.int64, 2)(xbits, j, least, span, positions, bits, count, first)

    def codegen(context, builder, sig, args):
        from numba.core import cgutils

        _, jv, least_v, span_v, _, _, count_v, first_v = args
        i1, i32, i64 = (ir.IntType(w) for w in (1, 32, 64))
        v16i32, v16i64, v8i64 = ir.VectorType(i32, 16), ir.VectorType(i64, 16), ir.VectorType(i64, 8)
        data = [context.make_array(t)(context, builder, a).data for t, a in zip(sig.args, args) if isinstance(t, types.Array)]
        x_data, p_data, b_data = data

        def splat(value, vector):
            one = builder.insert_element(ir.Constant(vector, ir.Undefined), value, ir.Constant(i32, 0))
            return builder.shuffle_vector(one, ir.Constant(vector, ir.Undefined), ir.Constant(ir.VectorType(i32, vector.count), [0] * vector.count))

        def low32(v):
            return builder.trunc(v, i32) if v.type.width > 32 else v

        def popcount(mask, width):
            t = ir.IntType(width)
            return builder.zext(builder.call(builder.module.declare_intrinsic("llvm.ctpop", [t]), [builder.bitcast(mask, t)]), i64)

        words = builder.load(builder.bitcast(builder.gep(x_data, [jv]), v16i32.as_pointer()), align=4)
        b = builder.and_(words, splat(ir.Constant(i32, 0x7FFFFFFF), v16i32))
        offset = builder.sub(b, splat(low32(least_v), v16i32))
        inside = builder.icmp_unsigned("<=", offset, splat(low32(span_v), v16i32))
        above = builder.icmp_unsigned(">", b, splat(builder.add(low32(least_v), low32(span_v)), v16i32))
        found = popcount(inside, 16)
        with builder.if_then(builder.icmp_unsigned("!=", found, ir.Constant(i64, 0)), likely=False):
            compress = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(v8i64, [v8i64, ir.VectorType(i1, 8), v8i64]),
                "llvm.experimental.vector.compress.v8i64")
            halves = [ir.Constant(ir.VectorType(i32, 8), list(range(h, h + 8))) for h in (0, 8)]
            masks = [builder.shuffle_vector(inside, inside, h) for h in halves]
            second = builder.add(count_v, popcount(masks[0], 8))
            index = builder.add(splat(builder.add(first_v, jv), v16i64), ir.Constant(v16i64, list(range(16))))
            for target, values in ((p_data, index), (b_data, builder.zext(b, v16i64))):
                for at, h, m in ((count_v, halves[0], masks[0]), (second, halves[1], masks[1])):
                    packed = builder.call(compress, [builder.shuffle_vector(values, values, h), m, ir.Constant(v8i64, ir.Undefined)])
                    builder.store(packed, builder.bitcast(builder.gep(target, [at]), v8i64.as_pointer()), align=8)
        return context.make_tuple(builder, sig.return_type, [found, popcount(above, 16)])

    return signature, codegen


@jit
def _count_noting_vector(xbits, state, positions, bits, shift):
    least, span = _bracket_bounds(state, shift)
    count, above, first, cap = state[NOTED], state[ABOVE], state[NEXT], positions.shape[0]
    j = 0
    while j + 16 <= xbits.shape[0] and count + 16 <= cap:
        found, over = _note16(xbits, j, least, span, positions, bits, count, first)
        count += found
        above += over
        j += 16
    count, above = _count_noting_from(xbits, j, state, positions, bits, shift, count, above)
    state[NOTED], state[ABOVE] = count, above
    state[NEXT] += xbits.shape[0]


# count_noting: note_bracket, and state[ABOVE] += the entries whose bin lies above the bracket. In
# vector code where llvmlite's LLVM has the compress intrinsic (LLVM 19 and later; with an older one,
# one entry at a time): 0.33 against 0.72 ns per entry, with 1.5% of the entries noted.
VECTOR_NOTES = llvm.llvm_version_info >= (19,)
count_noting = _count_noting_vector if VECTOR_NOTES else _count_noting_scalar


@jit
def note_bracket(xbits, state, positions, bits, shift):
    """For each entry whose bin (magnitude bits >> shift) lies in the bracket of `state`: its flat
    index (state[NEXT] + j) and magnitude bits written at positions[state[NOTED]], bits[state[NOTED]]
    while they have room. state[NOTED] counts them all; state[NEXT] moves past xbits. count_noting's
    loop, leaving state[ABOVE] as it was (a first chunk's entries above the bracket are counted in
    its histogram): 1.1 against 0.33 ns per entry one at a time, in a select's first chunk."""
    above = state[ABOVE]
    count_noting(xbits, state, positions, bits, shift)
    state[ABOVE] = above


@jit
def bracket_pass(xbits, hist, state, positions, bits, shift):
    """A select's first pass over xbits: high_histogram until the bracket is known (the first chunk's
    histogram picks it), count_noting after."""
    if state[BRACKETED]:
        count_noting(xbits, state, positions, bits, shift)
    else:
        high_histogram(xbits, hist, shift)
        state[NEXT] += xbits.shape[0]


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


@jit
def _extremes(xbits):
    """(the largest magnitude bits, the smallest nonzero ones minus one: 2^32 - 1 when all are
    zero), in one vectorized pass."""
    top, least = ZERO, np.uint32(0xFFFFFFFF)
    for j in range(xbits.shape[0]):
        b = np.uint32(xbits[j] & ABS)
        top = max(top, b)
        least = min(least, np.uint32(b - ONE))
    return top, least


@numba.njit(nogil=True, cache=True, boundscheck=False, fastmath={"reassoc"})
def _window_total(xbits, least):
    """Σ |x_j| in float64 over the entries whose magnitude bits are at least `least` (an exponent
    field's first). Exact whatever the order of the additions (so it may be vectorized): see
    abs_sum_bins."""
    total = 0.0
    for j in range(xbits.shape[0]):
        b = np.uint32(xbits[j] & ABS)
        total += np.float64(b.view(np.float32)) if b >= least else 0.0
    return total


@jit
def abs_sum_bins(xbits, bins, flags):
    """bins[·, e] += the significands (with the hidden bit where e is not 0) of the entries whose
    exponent field is e, in units of 2^(max(e, 1) - 150), and flags[0] = 1 for a NaN, flags[1] = 1
    for an infinity: abs_sum.AbsSum's exact sum.

    Block by block: the entries within WINDOW fields of the block's largest are multiples of its
    unit 2^(low - 150) below 2^42 units, so their float64 sum is an exact integer k < 2^53 of units
    in any order (a vectorized loop); k goes into the bins of `low` and `low + WINDOW` (2^WINDOW
    units of `low` each), below 2^35 per block. The smaller nonzero entries, rare (the block's
    smallest nonzero magnitude tells), and blocks holding specials or only tiny values take the
    entry-by-entry loop. Two vectorized passes over the block (in the L1 cache): its extremes,
    then the window's sum; 0.32 ns per entry, against 0.42 counting the entries below the window
    in the sum's loop."""
    n = xbits.shape[0]
    for a in range(0, n, SUM_BLOCK):
        block = xbits[a:min(n, a + SUM_BLOCK)]
        top, least_nonzero = _extremes(block)  # least_nonzero: the smallest nonzero one minus one
        high = np.uint32(top >> np.uint32(23))
        if high == SPECIAL or high <= WINDOW:
            _bin_entries(block, bins, flags, np.uint32(256))
            continue
        low = np.uint32(high - np.uint32(WINDOW))
        least = np.uint32(low << np.uint32(23))  # the smallest magnitude bits in the window (>= 2^23)
        k = np.int64(math.ldexp(_window_total(block, least), 150 - np.int64(low)))
        bins[0, low] += k & LOW_MASK
        bins[0, high] += k >> np.int64(WINDOW)
        if least_nonzero < least - ONE:  # a nonzero magnitude below the window
            _bin_entries(block, bins, flags, low)
