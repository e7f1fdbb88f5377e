"""Exact top-k by magnitude over a whole tensor, streamed: a radix select on the float bits.

Entries are ordered by magnitude, largest first; among equal magnitudes the entry with the
lower (flat, row-major) index comes first. That total order has a 63-bit integer *rank key*:

    key(i) = (bits(|x_i|) << 32) | (2**32 - 1 - i)

where bits(|x_i|) is the IEEE-754 pattern of |x_i| in float32 (sign bit clear, so a 31-bit
integer that orders like the value). A larger key ranks first, so "the top k entries" is
exactly "key >= the key of the k-th entry": a single 0-d int64 statistic (a *cutoff*) that
every chunk can compare against. Tensors of up to 2**32 entries are supported.

The k-th entry is found in one to four passes over the chunks:

1. a histogram (torch.bincount) of the top 16 of the 31 magnitude bits of the first chunk picks a
   bracket of bins around the one that would hold rank k if the chunk were the tensor
   (`RankCutoff._bracket`). The rest of the pass counts the entries above the bracket and notes
   the place and bits of every entry in it. When rank k falls among the noted entries, the notes
   stand in for passes 2 and 3 (on the benchmark family, every selection); else
2. the histogram of the top 16 bits of every entry locates the bin that holds rank k, and how many
   larger magnitudes lie above it;
3. a histogram of the low 15 bits of the entries in that bin gives the exact magnitude t of
   rank k — the value `torch.kthvalue` returns for the matching ascending rank — and how many
   of the entries equal to t rank before it;
4. only when the entries equal to t straddle the cut (some kept, some not): the flat index of
   the last one kept. Pass 3 notes the place of every entry of the chosen bin (up to POSITIONS of
   them), so that index is usually known then; only a larger bin takes a fourth pass, a scan.

A tensor of one chunk has its whole histogram after pass 1: pass 2 is never needed there.

Memory is two fixed histograms and up to POSITIONS notes; work is O(n). So exactly k entries are
kept, as in mergekit, whose choice among equal magnitudes follows an unstable sort; here the lower
index wins, so the result does not depend on the device, the chunk size or the sort
implementation. -0.0 and +0.0 are the same magnitude; a NaN counts as larger than +inf.
"""

from __future__ import annotations

import math

import numpy as np

from ..arrays import device_type, numel, to_torch
from ..lazy import torch
from . import native
from .registry import KernelContext, Param, in_range, op

HIGH_BITS = 16  # bins of the first pass: 2**16
LOW_BITS = 15  # bins of the low pass: 2**15 (31 magnitude bits in all)
INDEX_BITS = 32
_INDEX_MASK = (1 << INDEX_BITS) - 1
_LOW_MASK = (1 << LOW_BITS) - 1
MAX_ENTRIES = 1 << INDEX_BITS
KEEP_ALL = 0  # a cutoff below every key
KEEP_NONE = (1 << 63) - 1  # a cutoff above every key
# The state of the first pass (an int64 tensor, also native_loops'): the entries seen in the bracket
# of bins, the flat index of the next entry, the lowest and highest bin of the bracket, the entries
# seen above it, and whether the bracket is known (then entries are counted and noted, not binned).
NOTED, NEXT, LOWEST, HIGHEST, ABOVE, BRACKETED = range(6)
POSITIONS = 1 << 20  # entries of the bracket, or of the chosen high bin, whose places a pass notes (16 MB)


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
    if not native.high_histogram(x, hist, LOW_BITS):  # torch, on hist's memory where it is numpy's
        to_torch(hist).add_(high_histogram(magnitude_bits(to_torch(x))))


def add_low_histogram(hist: torch.Tensor, x: torch.Tensor, high: int) -> None:
    """hist (2**LOW_BITS int64) += low_histogram of x's magnitude bits for the bin `high`."""
    no_room = np.empty(0, dtype=np.int64)  # the loop notes no places
    if native.low_histogram_positions(x, hist, high, LOW_BITS, 0, no_room, no_room, 0) is None:
        to_torch(hist).add_(low_histogram(magnitude_bits(to_torch(x)), high))


def add_low_histogram_positions(hist: torch.Tensor, x: torch.Tensor, high: int, first: int,
                                positions: torch.Tensor, bits: torch.Tensor, count: int) -> int:
    """add_low_histogram, and the flat index (first + j) and magnitude bits of the entries of the
    bin `high` written into positions and bits from `count` on, while they have room (CPU int64
    buffers of one length); returns count plus the entries of the bin in x."""
    done = native.low_histogram_positions(x, hist, high, LOW_BITS, first, positions, bits, count)
    if done is not None:
        return done
    hist, positions, bits = to_torch(hist), to_torch(positions), to_torch(bits)
    m = magnitude_bits(to_torch(x))
    index = torch.nonzero((m >> LOW_BITS) == high).flatten()
    found = m[index].to(torch.int64)
    hist += torch.bincount(found & _LOW_MASK, minlength=1 << LOW_BITS)
    room = max(0, min(index.numel(), len(positions) - count))
    positions[count:count + room] = index[:room].cpu() + first
    bits[count:count + room] = found[:room].cpu()
    return count + index.numel()


def noted_low_histogram(bits: np.ndarray, count: int, high: int) -> tuple[np.ndarray, int]:
    """The low-bits histogram of the first `count` noted magnitude bits (int64) whose bin is `high`,
    and how many there are."""
    hist = np.zeros(1 << LOW_BITS, dtype=np.int64)
    found = native.noted_low_histogram(bits, count, high, LOW_BITS, hist)
    if found is None:
        noted = bits[:count]
        hist = np.bincount(noted[(noted >> LOW_BITS) == high] & _LOW_MASK, minlength=1 << LOW_BITS)
        found = int(hist.sum())
    return hist, found


def nth_noted(bits: np.ndarray, positions: np.ndarray, count: int, target: int, n: int) -> int:
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
    noted, first, lowest, highest = (int(v) for v in state[[NOTED, NEXT, LOWEST, HIGHEST]])
    x, state, positions, bits = to_torch(x), to_torch(state), to_torch(positions), to_torch(bits)
    m = magnitude_bits(x)
    high = m >> LOW_BITS
    index = torch.nonzero((high >= lowest) & (high <= highest)).flatten()
    room = max(0, min(index.numel(), len(positions) - noted))
    positions[noted:noted + room] = index[:room].cpu() + first
    bits[noted:noted + room] = m[index[:room]].cpu()
    state[NOTED] = noted + index.numel()
    state[NEXT] = first + x.numel()


def count_noting(x: torch.Tensor, state: torch.Tensor, positions: torch.Tensor, bits: torch.Tensor) -> None:
    """native_loops.count_noting: note_bracket, and state[ABOVE] += the entries of x whose high bin
    lies above the bracket."""
    if native.count_noting(x, state, positions, bits, LOW_BITS):
        return
    state[ABOVE] += int(((magnitude_bits(to_torch(x)) >> LOW_BITS) > int(state[HIGHEST])).sum())
    note_bracket(x, state, positions, bits)


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


def _picks(hist, ranks: list[int]) -> list[tuple[int, int]]:
    """For each rank (1-based, at most the histogram's total): the bin that holds the rank-th
    largest value of a histogram, and the rank that value has within its bin. One cumulative sum
    serves them all: bin b holds rank r when the entries of the bins below it, c[b - 1], are at
    most total - r and those up to it, c[b], more."""
    below = np.cumsum(hist if isinstance(hist, np.ndarray) else hist.cpu().numpy())
    total = int(below[-1])
    bins = np.searchsorted(below, [total - r for r in ranks], side="right").tolist()
    return [(b, r - (total - int(below[b]))) for b, r in zip(bins, ranks)]


def _pick(hist, rank: int) -> tuple[int, int]:
    """_picks for one rank."""
    return _picks(hist, [rank])[0]


class RankCutoff:
    """The rank key of the entry of rank `rank` (1 = the largest |x|) of a tensor, streamed over its
    chunks. `bound="lower"`: a cutoff that `key >= cutoff` keeps ranks 1..rank with; "upper": one
    that `key <= cutoff` keeps ranks rank..n with. `rank=None`: no data needed, `fixed` is the result.

    Its passes, in order (`stage`):
    - "bracket": the first chunk's high histogram picks a bracket of bins (_bracket); every later
      chunk only counts its entries above the bracket and notes the place and bits of those in it
      (count_noting). When rank k falls among the noted entries, they stand in for the next two
      passes; else
    - "high": the high histogram of every entry, which picks the bin of rank k;
    - "low": the low-bits histogram of that bin's entries, noting their places;
    - "scan": the flat index of the entry that splits a run of equal magnitudes, when the notes of
      the bin could not hold all of its entries.
    """

    def __init__(self, ctx: KernelContext, shape: tuple[int, ...], rank: int | None, bound: str = "lower",
                 fixed: int = KEEP_ALL):
        self.device = ctx.device
        self.cpu = device_type(ctx.device) == "cpu"  # its histograms are numpy arrays there, else tensors
        self.n = math.prod(shape)
        if rank is not None and self.n > MAX_ENTRIES:
            raise ValueError(f"exact top-k supports tensors of up to 2**32 entries, found {self.n}")
        self.rank, self.bound, self.key = rank, bound, fixed
        self.stage = "bracket"
        self.hist = self._zeros(1 << HIGH_BITS)
        self.binned = 0  # entries in the high histogram of the first pass: the first chunk's
        self.high = self.rank_in_bin = self.bits = self.tie = 0
        self.seen = 0  # entries seen so far in this pass
        self.pass_complete = False  # the executor may skip the rest of the chunks of this pass
        # The places and magnitude bits of the entries of the bracket (first pass) or of the chosen
        # bin (low pass), while they fit these buffers; in_bin: how many the chosen bin holds,
        # noted: how many the notes of the first pass hold, when they stand for the low pass.
        self.positions = self.magnitudes = None
        self.in_bin = self.noted = 0
        # native_loops' NOTED, NEXT, LOWEST, HIGHEST, ABOVE, BRACKETED; until the bracket is known,
        # one bin past the last
        self.state = np.array([0, 0, 1 << HIGH_BITS, 1 << HIGH_BITS, 0, 0], dtype=np.int64)

    def update(self, pass_: int, x: torch.Tensor) -> None:
        if self.rank is None or x.numel() == 0:
            return
        start, self.seen = self.seen, self.seen + x.numel()
        if self.stage == "bracket":
            self._buffers()
            if self.state[BRACKETED]:
                count_noting(x, self.state, self.positions, self.magnitudes)
                return
            add_high_histogram(self.hist, x)
            self._bracket(x.numel())
            note_bracket(x, self.state, self.positions, self.magnitudes)
        elif self.stage == "high":
            add_high_histogram(self.hist, x)
        elif self.stage == "low":
            self._buffers()
            self.in_bin = add_low_histogram_positions(self.hist, x, self.high, start, self.positions,
                                                      self.magnitudes, self.in_bin)
        elif self.tie > 0:  # scan, until the entry is found
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
            self.positions = np.empty(room, dtype=np.int64)
            self.magnitudes = np.empty(room, dtype=np.int64)

    def _bracket(self, count: int) -> None:
        """The bracket of the first pass, from the histogram of its first `count` entries: the bins of
        the ranks within 0.2% of that chunk's share of `rank`. On the benchmark family a chunk of a
        million entries points to the very bin the whole tensor's histogram chooses; where the
        tensor's other rows differ, rank k may fall outside the bracket (or the notes outgrow
        POSITIONS), and the high and low passes run."""
        share = min(count, max(1, round(self.rank * count / self.n)))
        spread = count // 512 + 1
        (lowest, _), (highest, _) = _picks(self.hist, [min(count, share + spread), max(1, share - spread)])
        self.state[LOWEST], self.state[HIGHEST] = lowest, highest  # lowest: the smaller magnitudes
        self.state[BRACKETED] = 1
        self.binned = count

    def taps(self, pass_: int) -> list | None:
        """The first pass is native_loops.bracket_pass, which a native region's loop may run (native_regions);
        the first chunk notes its entries afterwards (tapped_chunk), once the bracket is known."""
        if pass_ != 0 or self.rank is None:
            return None
        self._buffers()
        return [("bracket_pass", (self.hist, self.state, self.positions, self.magnitudes), (LOW_BITS,))]

    def tapped_chunk(self, x: torch.Tensor) -> None:
        """After a native loop's chunk of the first pass, its values x: the first one sets the bracket
        and notes its entries (the loop binned them)."""
        if not self.state[BRACKETED]:
            self.bracket_binned(numel(x))  # note_bracket counts nothing above: no count to put back
            self.note_chunk(x)

    def bracket_binned(self, count: int):
        """After a joint loop binned the first chunk (`count` entries) for this select (tapped.py):
        the bracket set and the chunk's first index put back, so that the loop's next run over the
        chunk notes its entries. That run also counts the entries above the bracket, which the
        histogram holds already; the function returned puts the count back as it was."""
        self._bracket(count)
        self.state[NEXT] -= count
        above = int(self.state[ABOVE])

        def put_back() -> None:
            self.state[ABOVE] = above
        return put_back

    def note_chunk(self, x: torch.Tensor) -> None:
        """The notes of the first chunk's values x, once bracket_binned set the bracket."""
        note_bracket(x, self.state, self.positions, self.magnitudes)

    def end_pass(self, pass_: int) -> bool:
        if self.rank is None or self.n == 0:
            return True
        self.seen = 0
        if self.stage == "bracket":
            noted, lowest, highest, above = (int(v) for v in self.state[[NOTED, LOWEST, HIGHEST, ABOVE]])
            fits = noted <= len(self.positions)
            if self.binned == self.n:  # one chunk: the histogram is whole
                self.high, self.rank_in_bin = _pick(self.hist, self.rank)
                inside = lowest <= self.high <= highest
            else:
                above += int(self.hist[highest + 1:].sum())
                inside = above < self.rank <= above + noted
                if inside and fits:
                    self.high, self.rank_in_bin = self._noted_bin(noted, lowest, highest, self.rank - above)
            if inside and fits:  # every entry of the chosen bin was noted, in index order
                self.noted = noted
                hist, self.in_bin = noted_low_histogram(self.magnitudes, noted, self.high)
                self.hist = hist if self.cpu else torch.from_numpy(hist).to(self.device)
                return self._low_done()
            if self.binned == self.n:
                self._start_low()
            else:
                self.stage = "high"
                self.hist[:] = 0
            return False
        if self.stage == "high":
            self.high, self.rank_in_bin = _pick(self.hist, self.rank)
            self._start_low()
            return False
        if self.stage == "low":
            return self._low_done()
        return True

    def _noted_bin(self, noted: int, lowest: int, highest: int, rank: int) -> tuple[int, int]:
        """The bin of the bracket that holds the rank-th largest noted entry, and its rank there."""
        if lowest == highest:
            return lowest, rank
        bins = np.bincount((self.magnitudes[:noted] >> LOW_BITS) - lowest, minlength=highest - lowest + 1)
        b, within = _pick(bins, rank)
        return lowest + b, within

    def _start_low(self) -> None:
        self.stage = "low"
        self.hist = self._zeros(1 << LOW_BITS)
        self.in_bin = self.noted = 0

    def _low_done(self) -> bool:
        """After the low histogram of the chosen bin: the cutoff, or False where a scan must find the
        index of the entry that splits a run of equal magnitudes."""
        low, self.tie = _pick(self.hist, self.rank_in_bin)  # the tie-th entry equal to t, by index
        ties = int(self.hist[low].item())
        self.bits = (self.high << LOW_BITS) | low
        self.hist = None
        positions, magnitudes, self.positions, self.magnitudes = self.positions, self.magnitudes, None, None
        self.stage = "scan"
        if self.bound == "lower" and self.tie == ties:  # every entry equal to t is kept
            self.key = self.bits << INDEX_BITS
            return True
        if self.bound == "upper" and self.tie == 1:
            self.key = (self.bits << INDEX_BITS) | _INDEX_MASK
            return True
        if self.in_bin <= len(positions):  # every entry of the bin was noted: no scan
            index = nth_noted(magnitudes, positions, self.noted or self.in_bin, self.bits, self.tie)
            self.key = (self.bits << INDEX_BITS) | (_INDEX_MASK - index)
            return True
        return False

    def _zeros(self, n: int):
        return np.zeros(n, dtype=np.int64) if self.cpu else torch.zeros(n, dtype=torch.int64, device=self.device)

    def result(self):
        """The cutoff: a 0-d int64 numpy array on the CPU (arrays.py), else a tensor on the device."""
        if self.cpu:
            return np.array(self.key, dtype=np.int64)
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
            return int(reducer.key)
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
