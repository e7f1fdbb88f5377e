"""Single-pass CPU loops (numba) for the hottest kernels: the random mask, the top-k histograms, tie
scan and select, and TIES's disjoint_merge.

In eager torch the random mask is a dozen passes over its chunk (rng.py), a top-k histogram three or
four, disjoint_merge about thirty; memory traffic, not arithmetic, sets their speed. Compiled once
per machine by numba and kept as machine code that later runs link without importing numba
(machine_code.py), each of these loops reads its inputs once.

Every loop computes exactly what the torch code it replaces computes: the mask, histograms and
selects with integer arithmetic on the float bits, copying a kept entry's bits (NaNs, infinities and
signed zeros included); disjoint_merge with its float32 operations in the torch code's order. So the
output does not depend on whether they run; tests/test_native.py compares each with the torch path.
They apply to contiguous float32 CPU chunks (numpy arrays or torch tensors) of at least
MIN_ELEMENTS entries (smaller ones take the first pass's noting loop where it is linked already);
anything else (a GPU,
another dtype, MERGELANG_NATIVE=0, NUMBA_DISABLE_JIT=1, or numba missing or failing to load) takes
the torch path.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import sys
import threading
from pathlib import Path

import numpy as np

from .. import rng
from ..arrays import cpu_dtype, numel
from ..lazy import torch
from . import machine_code

log = logging.getLogger(__name__)

ENV = "MERGELANG_NATIVE"
# Smaller chunks take the torch path: a run on tiny tensors would not repay linking the loops (30 ms,
# and seconds the first time they are compiled on a machine).
MIN_ELEMENTS = 1 << 16


# The C signature of each loop (machine_code.py): its argument types, its result. disjoint_merge
# takes a tuple of arrays: it runs as numba's dispatcher, and only where numba is imported already
# (a run that links its loops leaves the eager chunks of TIES's merge, rare, to torch: the same bits).
SIGNATURES = {
    "select_random": (("u32[]", "u32[]", "u64", "u64", "u64", "u64"), None),
    "high_histogram": (("u32[]", "i64[]", "u32"), None),
    "note_bracket": (("u32[]", "i64[]", "i64[]", "i64[]", "u32"), None),
    "count_noting": (("u32[]", "i64[]", "i64[]", "i64[]", "u32"), None),
    "low_histogram_positions": (("u32[]", "i64[]", "u32", "u32", "u32", "i64", "i64[]", "i64[]", "i64"), "i64"),
    "noted_low_histogram": (("i64[]", "i64", "i64", "i64", "i64", "i64[]"), "i64"),
    "nth_noted": (("i64[]", "i64[]", "i64", "i64", "i64"), "i64"),
    "keep_at_least": (("u32[]", "u32[]", "u32"), None),
    "nth_equal": (("u32[]", "u32", "i64"), "i64,i64"),
    "abs_sum_bins": (("u32[]", "i64[,]", "i64[]"), None),
    "disjoint_merge": None,
}

_resolving = threading.Lock()
_found: dict[str, object] = {}  # loop name → its callable, or None where it cannot run


def _loop(name: str, wait: bool = False):
    """The compiled loop `name` of native_loops, or None where numba is unavailable or turned off,
    or while another thread is loading or compiling a loop (30 ms from stored machine code, seconds
    to compile), unless `wait`: that thread's chunk waits for it, this one takes the torch path."""
    if os.environ.get(ENV, "1") == "0" or (SIGNATURES[name] is None and "numba" not in sys.modules):
        return None
    if name in _found:
        return _found[name]
    if not _resolving.acquire(blocking=wait):
        return None
    try:
        if name not in _found:
            _found[name] = _resolve(name)
        return _found[name]
    finally:
        _resolving.release()


@functools.cache
def sources_digest() -> str:
    """The digest of native_loops and the modules whose constants it compiles in: a loop's stored
    machine code (and a region that calls into native_loops, in its source) names it, so that a
    change there compiles them anew."""
    folder = Path(__file__).parent
    h = hashlib.sha256()
    for path in (folder / "native_loops.py", folder / "select.py", folder.parent / "rng.py"):
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def jit_disabled() -> bool:
    """numba's jit is turned off (NUMBA_DISABLE_JIT=1): its loops would run as Python, entry by entry.
    numba's own reading of its settings where it is imported, else the variable's."""
    numba = sys.modules.get("numba")
    if numba is not None and hasattr(numba, "config"):
        return bool(numba.config.DISABLE_JIT)
    return os.environ.get("NUMBA_DISABLE_JIT", "0").strip() not in ("", "0")


def _resolve(name: str):
    if jit_disabled():
        return None
    try:
        signature = SIGNATURES[name]
        if signature is None:
            return _native_loops()[name]
        return machine_code.entry(f"native_loops.{name} {sources_digest()}", *signature,
                                  lambda: _native_loops()[name])
    except Exception as error:  # not installed, or broken (an LLVM or cache setup error): stay correct
        log.warning("numba could not be loaded (%s): the torch kernels run instead", error)
        return None


@contextlib.contextmanager
def _no_blas_probe():
    """Within: `import scipy.linalg.cython_blas` fails (unless it is imported already). Loading its
    array functions (`numba.np.arraymath`, before the first loop compiles or loads from the cache),
    numba imports scipy.linalg to learn whether `np.dot` can call a BLAS; where scipy is installed
    that import took 0.21 s of numba's 0.45 s. mergelang's loops call no BLAS."""
    name = "scipy.linalg.cython_blas"
    if name in sys.modules:
        yield
        return
    sys.modules[name] = None  # the import system's mark for "not importable"
    try:
        yield
    finally:
        if name in sys.modules and sys.modules[name] is None:
            del sys.modules[name]


@functools.cache
def import_numba():
    """numba, imported for a compile (or a dispatcher)."""
    with _no_blas_probe():
        import numba
        import numba.np.arraymath  # noqa: F401 - its BLAS probe, made here
    return numba


def _native_loops() -> dict:
    import_numba()
    from . import native_loops

    return {name: getattr(native_loops, name) for name in SIGNATURES}


def _fits(x) -> bool:
    """x is a contiguous float32 CPU chunk (a numpy array or a torch tensor) of MIN_ELEMENTS or more."""
    return numel(x) >= MIN_ELEMENTS and cpu_dtype(x) == "float32"


def keep_random(x: torch.Tensor, key: int, start: int, keep_probability: float) -> torch.Tensor | None:
    """zero_unless(rng.keep_mask(key, start, x.numel(), keep_probability), x) in one pass; None where
    this loop does not apply."""
    loop = _loop("select_random") if _fits(x) else None
    if loop is None:
        return None
    limit = np.uint64(rng.threshold(keep_probability))
    out = torch.empty_like(x)
    xbits, obits = x.reshape(-1), out.reshape(-1)  # their bits: the loop's uint32 arrays
    pos, end = start, start + x.numel()
    while pos < end:  # segments that share an index's high 32 bits (one pair of round keys)
        stop = min(end, ((pos >> 32) + 1) << 32)
        k0, k1 = rng._round_keys(key, pos >> 32)
        a, b = pos - start, stop - start
        loop(xbits[a:b], obits[a:b], np.uint64(pos & rng.MASK32), np.uint64(k0), np.uint64(k1), limit)
        pos = stop
    return out


def high_histogram(x: torch.Tensor, hist: torch.Tensor, low_bits: int) -> bool:
    """hist += the histogram of the magnitude bits of x shifted right by low_bits; False where this
    loop does not apply (nothing added)."""
    loop = _loop("high_histogram") if _fits(x) and cpu_dtype(hist) == "int64" else None
    if loop is None:
        return False
    loop(x, hist, np.uint32(low_bits))
    return True


def note_bracket(x: torch.Tensor, state: torch.Tensor, positions: torch.Tensor, bits: torch.Tensor,
                 low_bits: int) -> bool:
    """native_loops.note_bracket over x (state, positions, bits: int64 CPU tensors); False where this
    loop does not apply (nothing noted)."""
    return _first_pass_loop("note_bracket", x, state, positions, bits, low_bits)


def count_noting(x: torch.Tensor, state: torch.Tensor, positions: torch.Tensor, bits: torch.Tensor,
                 low_bits: int) -> bool:
    """native_loops.count_noting over x, as note_bracket (it also counts the entries above the bracket)."""
    return _first_pass_loop("count_noting", x, state, positions, bits, low_bits)


def _first_pass_loop(name: str, x, state, positions, bits, low_bits: int) -> bool:
    """A chunk smaller than MIN_ELEMENTS takes the loop where it is linked already: a small tensor
    whose first pass ran in a region's loop (tapped.py) is noted here."""
    if cpu_dtype(x) != "float32":
        return False
    if numel(x) >= MIN_ELEMENTS:
        loop = _loop(name)
    else:
        loop = _found.get(name) if os.environ.get(ENV, "1") != "0" else None
    if loop is None:
        return False
    loop(x, state, positions, bits, np.uint32(low_bits))
    return True


def low_histogram_positions(x: torch.Tensor, hist: torch.Tensor, high: int, low_bits: int, first: int,
                            positions: torch.Tensor, bits: torch.Tensor, count: int) -> int | None:
    """hist += the histogram of the low `low_bits` magnitude bits of the entries of x whose high bits
    are `high`, also writing the flat index (first + j) and the magnitude bits of each entry it
    counts into positions and bits (int64) from `count` on, while they have room (none: empty
    buffers); returns count plus the entries counted, or None where this loop does not apply
    (nothing added)."""
    loop = _loop("low_histogram_positions") if _fits(x) and cpu_dtype(hist) == "int64" else None
    if loop is None:
        return None
    return int(loop(x, hist, np.uint32(high), np.uint32(low_bits), np.uint32((1 << low_bits) - 1),
                    first, positions, bits, count))


def noted_low_histogram(bits: torch.Tensor, count: int, high: int, low_bits: int, hist: torch.Tensor) -> int | None:
    """native_loops.noted_low_histogram over CPU int64 notes into hist (int64 CPU); None where this
    loop does not apply (nothing added)."""
    loop = _loop("noted_low_histogram") if count >= MIN_ELEMENTS else None
    if loop is None:
        return None
    return int(loop(bits, count, high, low_bits, (1 << low_bits) - 1, hist))


def nth_noted(bits: torch.Tensor, positions: torch.Tensor, count: int, target: int, n: int) -> int | None:
    """native_loops.nth_noted over CPU int64 notes; None where this loop does not apply."""
    loop = _loop("nth_noted") if count >= MIN_ELEMENTS else None
    if loop is None:
        return None
    return int(loop(bits, positions, count, target, n))


def nth_equal(x: torch.Tensor, t: int, n: int) -> tuple[int, int] | None:
    """(flat index in x, n) of the n-th entry (1-based) whose magnitude bits are t, or (-1, how many
    there are) when x has fewer; None where this loop does not apply."""
    loop = _loop("nth_equal") if _fits(x) else None
    if loop is None:
        return None
    j, count = loop(x, np.uint32(t), n)
    return int(j), int(count)


ABS_SUM_LANES = 4  # rows of bins native_loops.abs_sum_bins uses in turn (that module loads only when used)


def abs_sum_bins(x: torch.Tensor, bins: torch.Tensor, flags: torch.Tensor) -> bool:
    """abs_sum.AbsSum's bins (int64, ABS_SUM_LANES × 256) += x's significands by exponent field,
    and its flags (int64: NaN seen, infinity seen) set; False where this loop does not apply
    (nothing added)."""
    loop = _loop("abs_sum_bins") if _fits(x) else None
    if loop is None:
        return False
    loop(x, bins, flags)
    return True


def keep_at_least(x: torch.Tensor, t: int) -> torch.Tensor | None:
    """x where its magnitude bits are >= t (0 <= t < 2**31), +0.0 elsewhere; None where this loop
    does not apply."""
    loop = _loop("keep_at_least") if _fits(x) else None
    if loop is None:
        return None
    out = torch.empty_like(x)
    loop(x, out, np.uint32(t))
    return out


def disjoint_merge(xs, weights: list[float], normalize: bool, by_count: bool) -> torch.Tensor | None:
    """consensus.disjoint_merge over chunks of one shape; None where this loop does not apply."""
    x0 = xs[0]
    fits = torch.is_tensor(x0) and _fits(x0) and all(
        torch.is_tensor(x) and x.shape == x0.shape and _fits(x) for x in xs)
    loop = _loop("disjoint_merge") if fits else None
    if loop is None:
        return None
    out = torch.empty_like(x0)
    arrays = tuple(x.reshape(-1).numpy() for x in xs)
    ws = np.array(weights, dtype=np.float32)  # what torch multiplies a float32 tensor by
    loop(arrays, ws, out.reshape(-1).numpy(), normalize, by_count)
    return out
