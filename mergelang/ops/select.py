"""Exact top-k by magnitude over a whole tensor, streamed: a radix select on the float bits.

Entries are ordered by magnitude, largest first; among equal magnitudes the entry with the
lower (flat, row-major) index comes first. That total order has a 63-bit integer *rank key*:

    key(i) = (bits(|x_i|) << 32) | (2**32 - 1 - i)

where bits(|x_i|) is the IEEE-754 pattern of |x_i| in float32 (sign bit clear, so a 31-bit
integer that orders like the value). A larger key ranks first, so "the top k entries" is
exactly "key >= the key of the k-th entry": a single 0-d int64 statistic (a *cutoff*) that
every chunk can compare against. Tensors of up to 2**32 entries are supported.

The k-th entry is found in one to three passes over the chunks:

1. a histogram (torch.bincount) of the top 16 of the 31 magnitude bits locates the bin that
   holds rank k, and how many larger magnitudes lie above it. The pass also notes the place and
   bits of every entry of the bins around the one the first chunk's histogram points to
   (`RankCutoff._bracket`); when the chosen bin is among them, the notes stand in for pass 2;
2. a histogram of the low 15 bits of the entries in that bin gives the exact magnitude t of
   rank k — the value `torch.kthvalue` returns for the matching ascending rank — and how many
   of the entries equal to t rank before it;
3. only when the entries equal to t straddle the cut (some kept, some not): the flat index of
   the last one kept. The second pass notes the place of every entry of the chosen bin (up to
   POSITIONS of them), so that index is usually known then; only a larger bin takes a third pass,
   a scan.

Memory is two fixed histograms and up to POSITIONS notes; work is O(n). So exactly k entries are
kept, as in mergekit, whose choice among equal magnitudes follows an unstable sort; here the lower
index wins, so the result does not depend on the device, the chunk size or the sort
implementation. -0.0 and +0.0 are the same magnitude; a NaN counts as larger than +inf.
"""

from __future__ import annotations

import math

import torch

from . import native
from .registry import KernelContext, Param, in_range, op

HIGH_BITS = 16  # bins of the first pass: 2**16
LOW_BITS = 15  # bins of the second pass: 2**15 (31 magnitude bits in all)
INDEX_BITS = 32
_INDEX_MASK = (1 << INDEX_BITS) - 1
_LOW_MASK = (1 << LOW_BITS) - 1
MAX_ENTRIES = 1 << INDEX_BITS
KEEP_ALL = 0  # a cutoff below every key
KEEP_NONE = (1 << 63) - 1  # a cutoff above every key
POSITIONS = 1 << 20  # entries of the chosen high bin whose places the second pass notes (16 MB)
_NO_ROOM = torch.empty(0, dtype=torch.int64)  # for a low histogram that notes no places


def magnitude_bits(x: torch.Tensor) -> torch.Tensor:
    """The bit patterns of |x| in float32, flattened, as int32 (non-negative, monotone in |x|)."""
    return x.reshape(-1).to(torch.float32).view(torch.int32) & 0x7FFFFFFF


def high_histogram(bits: torch.Tensor) -> torch.Tensor:
    """The histogram of the top HIGH_BITS of magnitude bits (consumes `bits`: shifted in place)."""
    bits >>= LOW_BITS
    return torch.bincount(bits, minlength=1 << HIGH_BITS)


def low_histogram(bits: torch.Tensor, high: int) -> torch.Tensor:
    """The histogram of the low LOW_BITS of the magnitude bits whose high bits are `high` (consumes
    `bits`). Shifted so that the bin's entries land in 1..2**LOW_BITS and clamped, every entry is
    counted by one bincount, without gathering the bin's entries first (a boolean index costs more
    than the whole histogram); the two end bins, the entries outside, are dropped."""
    bits -= (high << LOW_BITS) - 1  # no overflow: bits <= 2**31 - 1 and high << LOW_BITS >= 0
    bits.clamp_(0, (1 << LOW_BITS) + 1)
    return torch.bincount(bits, minlength=(1 << LOW_BITS) + 2)[1:-1]


def add_high_histogram(hist: torch.Tensor, x: torch.Tensor) -> None:
    """hist (2**HIGH_BITS int64) += the histogram of the top HIGH_BITS of x's magnitude bits."""
    if not native.high_histogram(x, hist, LOW_BITS):
        hist += high_histogram(magnitude_bits(x))


def add_low_histogram(hist: torch.Tensor, x: torch.Tensor, high: int) -> None:
    """hist (2**LOW_BITS int64) += low_histogram of x's magnitude bits for the bin `high`."""
    if native.low_histogram_positions(x, hist, high, LOW_BITS, 0, _NO_ROOM, _NO_ROOM, 0) is None:
        hist += low_histogram(magnitude_bits(x), high)


def add_low_histogram_positions(hist: torch.Tensor, x: torch.Tensor, high: int, first: int,
                                positions: torch.Tensor, bits: torch.Tensor, count: int) -> int:
    """add_low_histogram, and the flat index (first + j) and magnitude bits of the entries of the
    bin `high` written into positions and bits from `count` on, while they have room (CPU int64
    buffers of one length); returns count plus the entries of the bin in x."""
    done = native.low_histogram_positions(x, hist, high, LOW_BITS, first, positions, bits, count)
    if done is not None:
        return done
    m = magnitude_bits(x)
    index = torch.nonzero((m >> LOW_BITS) == high).flatten()
    found = m[index].to(torch.int64)
    hist += torch.bincount(found & _LOW_MASK, minlength=1 << LOW_BITS)
    room = max(0, min(index.numel(), positions.numel() - count))
    positions[count:count + room] = index[:room].cpu() + first
    bits[count:count + room] = found[:room].cpu()
    return count + index.numel()


def noted_low_histogram(bits: torch.Tensor, count: int, high: int) -> tuple[torch.Tensor, int]:
    """The low-bits histogram of the first `count` noted magnitude bits whose bin is `high`, and how
    many there are."""
    hist = torch.zeros(1 << LOW_BITS, dtype=torch.int64)
    found = native.noted_low_histogram(bits, count, high, LOW_BITS, hist)
    if found is None:
        noted = bits[:count]
        hist = torch.bincount(noted[(noted >> LOW_BITS) == high] & _LOW_MASK, minlength=1 << LOW_BITS)
        found = int(hist.sum())
    return hist, found


def nth_noted(bits: torch.Tensor, positions: torch.Tensor, count: int, target: int, n: int) -> int:
    """The noted flat index of the n-th (1-based, in index order) of the first `count` notes whose
    magnitude bits are `target`; there are at least n."""
    found = native.nth_noted(bits, positions, count, target, n)
    if found is None:
        found = int(positions[:count][bits[:count] == target][n - 1])
    return found


def note_bracket(x: torch.Tensor, state: torch.Tensor, positions: torch.Tensor, bits: torch.Tensor) -> None:
    """native_loops.note_bracket: the flat index and magnitude bits of x's entries whose high bin lies
    in the bracket of `state` (int64 [noted, next index, lowest bin, highest bin]), written into
    positions and bits (CPU int64 buffers of one length) while they have room; the count and next
    index advanced."""
    if native.note_bracket(x, state, positions, bits, LOW_BITS):
        return
    noted, first, lowest, highest = (int(v) for v in state)
    m = magnitude_bits(x)
    high = m >> LOW_BITS
    index = torch.nonzero((high >= lowest) & (high <= highest)).flatten()
    room = max(0, min(index.numel(), positions.numel() - noted))
    positions[noted:noted + room] = index[:room].cpu() + first
    bits[noted:noted + room] = m[index[:room]].cpu()
    state[0] = noted + index.numel()
    state[1] = first + x.numel()


def rank_keys(x: torch.Tensor, start: int) -> torch.Tensor:
    """The rank key of each entry of x (flattened), whose first entry has flat index `start`."""
    index = torch.arange(start, start + x.numel(), dtype=torch.int64, device=x.device)
    return (magnitude_bits(x).to(torch.int64) << INDEX_BITS) | (_INDEX_MASK - index)


def keep_mask(x: torch.Tensor, start: int, cutoff: int, bound: str) -> torch.Tensor:
    """Booleans (flattened) for `rank key >= cutoff` (bound="lower") or `<= cutoff` ("upper"),
    for the entries of a chunk whose first entry has flat index `start` — computed on the 32-bit
    magnitudes, with the index compared only in a chunk that holds the cutoff's own entry."""
    n = x.numel()
    if cutoff == KEEP_ALL if bound == "lower" else cutoff == KEEP_NONE:
        return torch.ones(n, dtype=torch.bool, device=x.device)
    if cutoff == KEEP_NONE and bound == "lower":
        return torch.zeros(n, dtype=torch.bool, device=x.device)
    bits = magnitude_bits(x)
    t, last = cutoff >> INDEX_BITS, key_index(cutoff)
    lower = bound == "lower"
    ties_kept = (last >= start + n - 1) if lower else (last <= start)
    ties_dropped = (last < start) if lower else (last > start + n - 1)
    if ties_kept:
        return bits >= t if lower else bits <= t
    if ties_dropped:
        return bits > t if lower else bits < t
    index = torch.arange(start, start + n, dtype=torch.int64, device=x.device)
    tie_side = index <= last if lower else index >= last
    return (bits > t if lower else bits < t) | ((bits == t) & tie_side)


def keep_top_values(x: torch.Tensor, start: int, cutoff: int) -> torch.Tensor | None:
    """x (float32) with the entries whose rank key is below `cutoff` set to +0.0, the common case
    of keep_mask(x, start, cutoff, "lower") applied at once: when every entry of the chunk equal
    to the cutoff's magnitude is on the same side, the mask is the sign of bits - t, built with
    integer ops (a comparison into booleans costs more than the three of them). None for the
    other cases (other dtypes, no data needed, or a chunk that holds the cutoff's own entry)."""
    if x.dtype != torch.float32 or cutoff in (KEEP_ALL, KEEP_NONE):
        return None
    n = x.numel()
    t, last = cutoff >> INDEX_BITS, key_index(cutoff)
    if last < start:
        t += 1  # every entry equal to t is dropped: keep bits >= t + 1
    elif last < start + n - 1:
        return None
    if t > 0x7FFFFFFF:
        return None
    kept = native.keep_at_least(x, t)
    if kept is not None:
        return kept
    xbits = x.reshape(-1).view(torch.int32)
    m = xbits & 0x7FFFFFFF
    m -= t  # no overflow: both are in [0, 2**31)
    m >>= 31  # -1 where dropped
    m.bitwise_not_()
    m &= xbits
    return m.view(torch.float32).view(x.shape)


def key_magnitude(key: int) -> float:
    """The magnitude part of a rank key, as a float."""
    return torch.tensor([key >> INDEX_BITS], dtype=torch.int32).view(torch.float32).item()


def key_index(key: int) -> int:
    """The flat index part of a rank key."""
    return _INDEX_MASK - (key & _INDEX_MASK)


def _pick(hist: torch.Tensor, rank: int) -> tuple[int, int]:
    """The bin that holds the `rank`-th largest value (1-based) of a histogram, and the rank
    that value has within its bin."""
    from_top = hist.flip(0).cumsum(0)
    target = torch.tensor([rank], dtype=from_top.dtype, device=from_top.device)
    j = int(torch.searchsorted(from_top, target).item())
    b = hist.numel() - 1 - j
    before = int(from_top[j].item()) - int(hist[b].item())
    return b, rank - before


class RankCutoff:
    """The rank key of the entry of rank `rank` (1 = the largest |x|) of a tensor, streamed over its
    chunks. `bound="lower"`: a cutoff that `key >= cutoff` keeps ranks 1..rank with; "upper": one
    that `key <= cutoff` keeps ranks rank..n with. `rank=None`: no data needed, `fixed` is the result."""

    def __init__(self, ctx: KernelContext, shape: tuple[int, ...], rank: int | None, bound: str = "lower",
                 fixed: int = KEEP_ALL):
        self.device = ctx.device
        self.n = math.prod(shape)
        if rank is not None and self.n > MAX_ENTRIES:
            raise ValueError(f"exact top-k supports tensors of up to 2**32 entries, found {self.n}")
        self.rank, self.bound, self.key = rank, bound, fixed
        self.hist = torch.zeros(1 << HIGH_BITS, dtype=torch.int64, device=self.device)
        self.high = self.rank_in_bin = self.bits = self.tie = 0
        self.seen = 0  # entries seen so far in this pass
        self.pass_complete = False  # the executor may skip the rest of the chunks of this pass
        # The second pass notes the places and magnitude bits of the entries of the chosen high bin
        # (while they fit these buffers), so that the entry that splits a run of equal magnitudes is
        # found without a third. The first pass notes those of a bracket of high bins around the
        # one the first chunk points to (see _bracket); when the chosen bin is among them there is
        # no second pass. `noted`: how many entries the notes hold (all of the chosen bin's when
        # in_bin <= the room).
        self.positions = self.magnitudes = None
        self.in_bin = self.noted = 0
        # native_loops' NOTED, NEXT, LOWEST, HIGHEST; until the bracket is known, one bin past the last
        self.state = torch.tensor([0, 0, 1 << HIGH_BITS, 1 << HIGH_BITS], dtype=torch.int64)
        self.bracketed = False

    def update(self, pass_: int, x: torch.Tensor) -> None:
        if self.rank is None or x.numel() == 0:
            return
        start, self.seen = self.seen, self.seen + x.numel()
        if pass_ >= 2 and self.tie <= 0:
            return  # found in an earlier chunk
        if pass_ == 0:
            add_high_histogram(self.hist, x)
            if not self.bracketed:
                self._bracket(x.numel())
            self._buffers()
            note_bracket(x, self.state, self.positions, self.magnitudes)
        elif pass_ == 1:
            self._buffers()
            self.in_bin = add_low_histogram_positions(self.hist, x, self.high, start, self.positions,
                                                      self.magnitudes, self.in_bin)
        else:
            found = native.nth_equal(x, self.bits, self.tie)
            if found is None:
                ties = magnitude_bits(x) == self.bits
                count = int(ties.sum().item())
                found = (int(torch.nonzero(ties)[self.tie - 1].item()) if count >= self.tie else -1), count
            j, count = found
            if j >= 0:  # the tie-th entry equal to t is in this chunk
                self.key = (self.bits << INDEX_BITS) | (_INDEX_MASK - (start + j))
            self.tie -= count
            self.pass_complete = self.tie <= 0

    def _buffers(self) -> None:
        if self.positions is None:
            room = min(self.n, POSITIONS)
            self.positions = torch.empty(room, dtype=torch.int64)
            self.magnitudes = torch.empty(room, dtype=torch.int64)

    def _bracket(self, count: int) -> None:
        """The bracket of the first pass, from the histogram of its first `count` entries: the bins of
        the ranks within 0.2% of that chunk's share of `rank`. On the benchmark family a chunk of a
        million entries points to the very bin the whole tensor's histogram chooses; where the
        tensor's other rows differ, the chosen bin may fall outside the bracket (or the notes
        outgrow POSITIONS), and the second pass runs as before."""
        share = min(count, max(1, round(self.rank * count / self.n)))
        spread = count // 512 + 1
        self.state[2] = _pick(self.hist, min(count, share + spread))[0]  # LOWEST: the smaller magnitudes
        self.state[3] = _pick(self.hist, max(1, share - spread))[0]  # HIGHEST
        self.bracketed = True

    def taps(self, pass_: int) -> list | None:
        """Pass 0 is the high histogram, with the entries of the bracket noted, which a native
        region's loop may do (native_regions); the first chunk notes its entries afterwards
        (tapped_chunk), once the bracket is known."""
        if pass_ != 0 or self.rank is None:
            return None
        self._buffers()
        return [("high_histogram_noting", (self.hist, self.state, self.positions, self.magnitudes), (LOW_BITS,))]

    def tapped_chunk(self, x: torch.Tensor) -> None:
        """After a native loop's chunk of pass 0, its values x: the first one sets the bracket and
        notes its entries (the loop noted none)."""
        if not self.bracketed:
            self._bracket(x.numel())
            self.state[1] -= x.numel()  # NEXT: back to the chunk's first entry
            note_bracket(x, self.state, self.positions, self.magnitudes)

    def end_pass(self, pass_: int) -> bool:
        if self.rank is None or self.n == 0:
            return True
        self.seen = 0
        if pass_ == 0:
            self.high, self.rank_in_bin = _pick(self.hist, self.rank)
            noted, lowest, highest = (int(v) for v in self.state[[0, 2, 3]])
            if lowest <= self.high <= highest and noted <= self.positions.numel():
                # every entry of the chosen bin was noted, in index order: the second pass's results
                self.noted = noted
                hist, self.in_bin = noted_low_histogram(self.magnitudes, noted, self.high)
                self.hist = hist.to(self.device)
                return self.end_pass(1)
            self.hist = torch.zeros(1 << LOW_BITS, dtype=torch.int64, device=self.device)
            return False
        if pass_ == 1:
            low, self.tie = _pick(self.hist, self.rank_in_bin)  # the tie-th entry equal to t, by index
            ties = int(self.hist[low].item())
            self.bits = (self.high << LOW_BITS) | low
            self.hist = None
            positions, magnitudes, self.positions, self.magnitudes = self.positions, self.magnitudes, None, None
            if self.bound == "lower" and self.tie == ties:  # every entry equal to t is kept
                self.key = self.bits << INDEX_BITS
                return True
            if self.bound == "upper" and self.tie == 1:
                self.key = (self.bits << INDEX_BITS) | _INDEX_MASK
                return True
            if self.in_bin <= positions.numel():  # every entry of the bin was noted: no third pass
                index = nth_noted(magnitudes, positions, self.noted or self.in_bin, self.bits, self.tie)
                self.key = (self.bits << INDEX_BITS) | (_INDEX_MASK - index)
                return True
            return False
        return True

    def result(self) -> torch.Tensor:
        return torch.tensor(self.key, dtype=torch.int64, device=self.device)


def topk_count(n: int, density: float) -> int:
    """How many entries `topk_cutoff` keeps: mergekit's max(1, int(density * n)); all when density >= 1."""
    return n if density >= 1 else max(1, int(density * n))


def band_counts(n: int, density: float, gamma: float) -> tuple[int, int]:
    """(cut, kept) for `band_cutoff`, as mergekit's magnitude_outliers: kept = int(density * n),
    cut = min(int(gamma * n), n - kept) largest entries dropped as outliers; density >= 1 keeps all."""
    if density >= 1:
        return 0, n
    kept = int(density * n)
    return min(int(gamma * n), n - kept), kept


@op(
    "topk_cutoff",
    1,
    (Param("density", check=in_range(0, 1, lo_open=True), doc="fraction of entries to keep"),),
    kind="reduce",
    tensor_inputs=True,
)
class TopkCutoff(RankCutoff):
    """topk_cutoff(x, density): the rank key of the k-th largest entry of x by magnitude, over the
    whole tensor, k = max(1, ⌊density·n⌋) (mergekit's rounding); ties in magnitude go to the lower
    index. `keep_top(x, topk_cutoff(x, density))` keeps exactly those k entries. density = 1 keeps all."""

    def __init__(self, ctx: KernelContext, shape: tuple[int, ...], *, density: float):
        n = math.prod(shape)
        if density >= 1:
            super().__init__(ctx, shape, None, fixed=KEEP_ALL)
        else:
            super().__init__(ctx, shape, topk_count(n, density))


@op(
    "band_cutoff",
    1,
    (
        Param("density", check=in_range(0, 1, lo_open=True), doc="fraction of entries to keep"),
        Param("gamma", 0.01, check=in_range(0, 1), doc="fraction of the largest magnitudes cut as outliers"),
        Param("bound", "lower", kind="choice", choices=("lower", "upper"), doc="which end of the band"),
    ),
    kind="reduce",
    tensor_inputs=True,
)
class BandCutoff(RankCutoff):
    """band_cutoff(x, density, gamma=0.01, bound="lower"|"upper"): the ends of the band of magnitudes
    that Model Breadcrumbs keeps. With n entries, k = ⌊density·n⌋ and g = min(⌊gamma·n⌋, n − k)
    (mergekit's magnitude_outliers), the g largest entries are cut as outliers and the next k kept:
    ranks g+1 … g+k (ties in magnitude go to the lower index). bound="lower" is the rank key of rank
    g+k, bound="upper" that of rank g+1, so `keep_band(x, lower, upper)` keeps exactly those k entries.
    k = 0 keeps nothing; g = 0 cuts no outlier; density = 1 keeps everything, whatever gamma."""

    def __init__(self, ctx: KernelContext, shape: tuple[int, ...], *, density: float, gamma: float, bound: str):
        n = math.prod(shape)
        cut, kept = band_counts(n, density, gamma)
        if bound == "lower":
            if kept == 0:
                super().__init__(ctx, shape, None, fixed=KEEP_NONE)
            elif cut + kept == n:
                super().__init__(ctx, shape, None, fixed=KEEP_ALL)
            else:
                super().__init__(ctx, shape, cut + kept, "lower")
        elif cut == 0:
            super().__init__(ctx, shape, None, fixed=KEEP_NONE)  # `key <= KEEP_NONE` holds for every key
        else:
            super().__init__(ctx, shape, cut + 1, "upper")


def kth_largest_key(x: torch.Tensor, rank: int, bound: str = "lower", chunk: int | None = None) -> int:
    """The rank key of the `rank`-th largest entry of x (1-based) by the streaming select, fed in
    chunks of `chunk` entries when given. For tests and direct use."""
    flat = x.reshape(-1)
    reducer = RankCutoff(KernelContext(device=x.device), (flat.numel(),), rank, bound)
    step = chunk or max(1, flat.numel())
    pass_ = 0
    while True:
        for s in range(0, flat.numel(), step):
            reducer.update(pass_, flat[s:s + step])
        if reducer.end_pass(pass_):
            return int(reducer.result().item())
        pass_ += 1


# ---- whole-model selection ------------------------------------------------------------------------


@op(
    "model_magnitude_threshold",
    1,
    (Param("density", check=in_range(0, 1, lo_open=True), doc="fraction of the model's entries to keep"),),
    kind="model",
    tensor_inputs=True,
)
class ModelMagnitudeThreshold:
    """model_magnitude_threshold(x, density): the magnitude t such that |x| >= t keeps the top `density`
    of x's entries over EVERY tensor of the model, not per tensor — the TIES paper's trim, as MergeLM
    computes it: t is the k-th smallest |x| with k = ⌊(1 - density)·N⌋ over all N entries, and entries
    equal to t are kept. density = 1 (k = 0) keeps everything.

    A statistic of the whole model: the executor runs it over all tensors (two histogram passes of
    the float bits, as topk_cutoff does per tensor) before it writes any tensor."""

    def __init__(self, ctx: KernelContext, total: int, *, density: float):
        self.device = ctx.device
        self.k = int((1 - density) * total) if density < 1 else 0
        self.hist = torch.zeros(1 << HIGH_BITS, dtype=torch.int64, device=self.device)
        self.high = self.rank_in_bin = 0
        self.bits = 0

    def update(self, pass_: int, x: torch.Tensor) -> None:
        if self.k == 0 or x.numel() == 0:
            return
        if pass_ == 0:
            add_high_histogram(self.hist, x)
        else:
            add_low_histogram(self.hist, x, self.high)

    def end_pass(self, pass_: int) -> bool:
        if self.k == 0:
            return True
        # The k-th smallest: the bin where the ascending cumulative count reaches k.
        cumulative = torch.cumsum(self.hist, 0)
        index = int(torch.searchsorted(cumulative, torch.tensor(self.k, device=self.device)).item())
        below = int(cumulative[index - 1].item()) if index > 0 else 0
        if pass_ == 0:
            self.high, self.rank_in_bin = index, self.k - below
            self.hist = torch.zeros(1 << LOW_BITS, dtype=torch.int64, device=self.device)
            self.k = self.rank_in_bin
            return False
        self.bits = (self.high << LOW_BITS) | index
        return True

    def result(self) -> torch.Tensor:
        bits = torch.tensor(self.bits, dtype=torch.int32, device=self.device)
        return bits.view(torch.float32)
