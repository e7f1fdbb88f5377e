"""Time the native loops per entry, one thread, against the ways they replaced. Run by hand:

    python benchmarks/loops.py [--entries 524288] [--runs 25]

Prints a markdown table of median nanoseconds per entry. The data are deltas of bf16 weights
(base N(0, 0.02), fine-tune = base + N(0, 0.005)), as in benchmarks/bench.py. Each loop is
compiled (or loaded from numba's cache) before it is timed.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numba
import numpy as np
import torch

from mergelang import native_regions, rng
from mergelang.graph import Node, const, with_random_key
from mergelang.ops import native_loops
from mergelang.schedule import region

ABS = np.uint32(0x7FFFFFFF)


def median_ns(fn, entries: int, runs: int) -> float:
    fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) / entries * 1e9


@numba.njit(boundscheck=False)
def _repeat_blocks(bits, bins, flags, repeats, per_entry):
    """The exact L1 sum over one L1-resident block, `repeats` times (a tap's view of it)."""
    for _ in range(repeats):
        if per_entry:
            native_loops._bin_entries(bits, bins, flags, np.uint32(256))
        else:
            native_loops.abs_sum_bins(bits, bins, flags)


@numba.njit(boundscheck=False)
def _mask_64bit(xbits, out, first, k0, k1, limit):
    """The random mask with the draw in numba's 64-bit integers (what draw32 replaced)."""
    for j in range(xbits.shape[0]):
        x = ((first + np.uint64(j)) & np.uint64(0xFFFFFFFF)) ^ k0
        x ^= x >> np.uint64(16)
        x = (x * np.uint64(rng.M1)) & np.uint64(0xFFFFFFFF)
        x ^= (x >> np.uint64(15)) ^ k1
        x = (x * np.uint64(rng.M2)) & np.uint64(0xFFFFFFFF)
        x ^= x >> np.uint64(16)
        out[j] = xbits[j] if x < limit else np.uint32(0)


def _loop(steps, kinds, taps=(), out="f32"):
    source, _ = native_regions._generate(steps, kinds, taps, out)
    function = native_regions._load(source).region
    function.compile(native_regions._signature(kinds, taps, out))
    return function


def _load(name: str) -> Node:
    return Node("load", (), {"model": name})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--entries", type=int, default=1 << 19,
                   help="entries per call of each loop (default: %(default)s; the executor's chunks are twice that)")
    p.add_argument("--runs", type=int, default=25, help="timed calls per row (default: %(default)s)")
    args = p.parse_args()
    n, runs = args.entries, args.runs
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    base = (torch.randn(n, generator=g) * 0.02).to(torch.bfloat16)
    fts = [(base.float() + torch.randn(n, generator=g) * 0.005).to(torch.bfloat16) for _ in range(3)]
    u16 = [t.view(torch.int16).numpy().view(np.uint16) for t in [base, *fts]]
    delta = (fts[0].float() - base.float()).numpy()
    rows = []

    block = delta[:native_loops.SUM_BLOCK].view(np.uint32).copy()
    bins, flags = np.zeros((4, 256), np.int64), np.zeros(2, np.int64)
    repeats = max(1, n // block.size)
    for label, per_entry in (("every entry binned", True), ("float64 window + bins", False)):
        ns = median_ns(lambda: _repeat_blocks(block, bins, flags, repeats, per_entry), repeats * block.size, runs)
        rows.append(("exact L1 sum, L1-resident block", label, ns))

    key = rng.derive_key(0, "bench", b"mask")
    k0, k1 = (np.uint64(k) for k in rng._round_keys(key, 0))
    limit = np.uint64(rng.threshold(0.1))
    xbits, out = delta.view(np.uint32), np.empty(n, np.uint32)
    rows.append(("random mask (density 0.1)", "draw in 64-bit integers",
                 median_ns(lambda: _mask_64bit(xbits, out, np.uint64(0), k0, k1, limit), n, runs)))
    rows.append(("random mask (density 0.1)", "draw32, 32-bit lanes",
                 median_ns(lambda: native_loops.select_random(xbits, out, np.uint64(0), k0, k1, limit), n, runs)))

    b, f = _load("base"), [_load(f"ft{i}") for i in range(3)]
    linear = Node("add", [b, Node("weighted_sum", [*(Node("sub", [x, b]) for x in f),
                                                   const(0.5), const(0.3), const(0.2), const(False)])])
    steps, kinds, no_keys = region(linear), ("bf16",) * 4, np.zeros(0, np.uint64)
    f32, bf16 = _loop(steps, kinds), _loop(steps, kinds, out="bf16")
    out32, out16 = np.empty(n, np.float32), np.empty(n, np.uint16)
    call = (n, 0, np.uint64(0), no_keys)

    def f32_then_torch():
        f32(*call, *u16, out32)
        torch.from_numpy(out32).to(torch.bfloat16)

    rows.append(("linear output region to bf16", "float32, then torch converts", median_ns(f32_then_torch, n, runs)))
    rows.append(("linear output region to bf16", "bf16 from the loop",
                 median_ns(lambda: bf16(*call, *u16, out16), n, runs)))

    d = Node("sub", [f[0], b])
    kept = with_random_key(Node("keep_random", [d, const(0.1), const(0)]))
    keys = np.array(rng._round_keys(key, 0), dtype=np.uint64)
    steps = region(kept)
    plain = _loop(steps, ("bf16", "bf16"))
    delta_step = next(i for i, s in enumerate(steps) if s.node is d)
    sum_tap = ("abs_sum_bins", (), (2, 1))  # an exact sum: loop, constants, dimensions of bins and flags
    taps = tuple((i, *sum_tap) for i in (delta_step, len(steps) - 1))
    tapped = _loop(steps, ("bf16", "bf16"), taps)
    sums = [(np.zeros((4, 256), np.int64), np.zeros(2, np.int64)) for _ in range(2)]
    deltas = np.empty(n, np.float32)
    sub = _loop(region(d), ("bf16", "bf16"))

    def three_passes():
        plain(n, 0, np.uint64(0), keys, u16[1], u16[0], out32)
        sub(n, 0, np.uint64(0), no_keys, u16[1], u16[0], deltas)
        native_loops.abs_sum_bins(deltas.view(np.uint32), *sums[0])
        native_loops.abs_sum_bins(out32.view(np.uint32), *sums[1])

    rows.append(("DARE mask and its two L1 sums", "mask, delta again, two sums: 4 passes",
                 median_ns(three_passes, n, runs)))
    rows.append(("DARE mask and its two L1 sums", "one tapped loop",
                 median_ns(lambda: tapped(n, 0, np.uint64(0), keys, u16[1], u16[0], out32,
                                          *sums[0], *sums[1]), n, runs)))

    print(f"Native loops, one thread, {n} entries per call, median of {runs} calls (ns per entry):\n")
    print("| loop | variant | ns per entry |\n| --- | --- | ---: |")
    for loop, variant, ns in rows:
        print(f"| {loop} | {variant} | {ns:.2f} |")


if __name__ == "__main__":
    main()
