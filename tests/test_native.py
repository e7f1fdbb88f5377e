"""The numba loops (ops/native.py) against the torch code they replace: the same bits, entry by entry,
and the same output files for whole merges."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import mergelang.ops
from conftest import digests, write_spec
from mergelang import rng
from mergelang.api import RunOptions, run
from mergelang.ops import OPS, KernelContext, machine_code, native
from mergelang.ops import select as S
from mergelang.ops.fast import zero_unless

N = 3 * native.MIN_ELEMENTS + 17  # long enough for the loops, and not a round number


@pytest.fixture(autouse=True)
def _native_on(monkeypatch):
    monkeypatch.delenv(native.ENV, raising=False)
    assert native._loop("high_histogram") is not None, "numba is a dependency: the loops must be available"


def awkward(n: int = N, seed: int = 0) -> torch.Tensor:
    """Deltas with zeros of both signs, NaNs, infinities, subnormals and repeated magnitudes."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * 0.005
    x[::97] = 0.0
    x[1::101] = -0.0
    x[2::1009] = float("nan")
    x[3::2003] = float("inf")
    x[4::3001] = -float("inf")
    x[5::499] = 1e-40
    x[6::53] = x[6]  # a magnitude shared by many entries
    x[7::59] = -x[6]
    return x


def bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int32)


@pytest.mark.parametrize("start", [0, 12345, (1 << 32) - 5000, (7 << 32) + 3])
@pytest.mark.parametrize("density", [0.1, 0.5, 0.999999, 1e-12])
def test_keep_random_matches_rng(start, density):
    x = awkward()
    key = rng.derive_key(3, "model.layers.0.mlp.up_proj.weight", b"\x01\x02")
    got = native.keep_random(x, key, start, density)
    want = zero_unless(rng.keep_mask(key, start, x.numel(), density), x)
    assert got is not None and torch.equal(bits(got), bits(want))
    # and the draws themselves, at a few indices, against the pure-Python definition
    for j in (0, 1, N // 2, N - 1):
        kept = rng.reference_draw(key, start + j) < rng.threshold(density)
        assert bool(bits(got)[j] == bits(x)[j]) if kept else int(bits(got)[j]) == 0


def test_random_ops_native_and_torch_agree(monkeypatch):
    x = awkward(seed=1)[: N // 7 * 7].view(-1, 7)  # a chunk of rows
    ctx = KernelContext(tensor="t", start=5 << 20, seed=0)
    ctx.key = 0xDEADBEEF12345678
    native_out = {"dare": OPS["dare"].kernel(ctx, x, p=0.9, seed=0),
                  "keep_random": OPS["keep_random"].kernel(ctx, x, density=0.3, seed=0)}
    monkeypatch.setenv(native.ENV, "0")
    for name, kwargs in (("dare", {"p": 0.9}), ("keep_random", {"density": 0.3})):
        torch_out = OPS[name].kernel(ctx, x, **kwargs, seed=0)
        assert torch.equal(bits(native_out[name]), bits(torch_out)), name


@pytest.mark.parametrize("seed", [0, 1])
def test_histograms_match_torch(seed):
    x = awkward(seed=seed)
    hist = torch.zeros(1 << S.HIGH_BITS, dtype=torch.int64)
    hist[5] = 7  # the loops add to what is there
    assert native.high_histogram(x, hist, S.LOW_BITS)
    want = S.high_histogram(S.magnitude_bits(x))
    want[5] += 7
    assert torch.equal(hist, want)
    for high in (int(S.magnitude_bits(x)[6]) >> S.LOW_BITS, int(S.magnitude_bits(x)[100]) >> S.LOW_BITS, 0):
        low = torch.zeros(1 << S.LOW_BITS, dtype=torch.int64)
        none = torch.empty(0, dtype=torch.int64)
        assert native.low_histogram_positions(x, low, high, S.LOW_BITS, 0, none, none, 0) is not None
        assert torch.equal(low, S.low_histogram(S.magnitude_bits(x), high))


@pytest.mark.parametrize("room", [1 << 20, 100])
@pytest.mark.parametrize("seed", [0, 1])
def test_low_histogram_with_positions_matches_torch(monkeypatch, seed, room):
    """The second pass's histogram, count, and noted places and magnitude bits, native and torch, with
    room for the whole bin and with too little (the count goes on, the buffers stop)."""
    x = awkward(seed=seed)
    for high in (int(S.magnitude_bits(x)[6]) >> S.LOW_BITS, int(S.magnitude_bits(x)[100]) >> S.LOW_BITS, 0):
        results = []
        for env in ("1", "0"):
            monkeypatch.setenv(native.ENV, env)
            hist = torch.zeros(1 << S.LOW_BITS, dtype=torch.int64)
            positions = torch.full((room,), -1, dtype=torch.int64)
            lows = torch.full((room,), -1, dtype=torch.int64)
            count = S.add_low_histogram_positions(hist, x[:N // 2], high, 0, positions, lows, 3)
            count = S.add_low_histogram_positions(hist, x[N // 2:], high, N // 2, positions, lows, count)
            results.append((hist, count, positions, lows))
        (h1, c1, p1, l1), (h0, c0, p0, l0) = results
        assert torch.equal(h1, S.low_histogram(S.magnitude_bits(x), high))
        assert torch.equal(h1, h0) and c1 == c0 == 3 + int(h1.sum())
        assert torch.equal(p1, p0) and torch.equal(l1, l0)
        noted = min(room, c1) - 3
        in_bin = torch.nonzero((S.magnitude_bits(x) >> S.LOW_BITS) == high).flatten()
        assert torch.equal(p1[3:3 + noted], in_bin[:noted])
        assert torch.equal(l1[3:3 + noted], S.magnitude_bits(x)[in_bin[:noted]].long())


@pytest.mark.parametrize("rank", [1, 1000, N // 2, N - 1])
def test_top_k_cutoff_matches_sort(rank):
    """The streamed select with the native histograms keeps exactly the top `rank` rank keys of a
    full sort."""
    x = awkward(seed=2)
    keys = S.rank_keys(x, 0)
    kept = keys >= S.kth_largest_key(x, rank, chunk=native.MIN_ELEMENTS)
    assert int(kept.sum()) == rank
    assert int(keys[kept].min()) == int(keys.sort(descending=True).values[rank - 1])


@pytest.mark.parametrize("room", [S.POSITIONS, 1000])
@pytest.mark.parametrize("native_on", ["1", "0"])
@pytest.mark.parametrize("into_group", [1, 2, 777, "last"])
def test_top_k_cutoff_inside_a_run_of_equal_magnitudes(monkeypatch, native_on, into_group, room):
    """The cut falls among entries of one magnitude: the places the second pass noted give the last
    one kept by index, or, when the bin had more entries than room, the third pass finds it."""
    monkeypatch.setenv(native.ENV, native_on)
    monkeypatch.setattr(S, "POSITIONS", room)
    x = awkward(seed=4)
    x[10::7] = torch.where(torch.arange(len(x[10::7])) % 2 == 0, 0.01, -0.01)  # one magnitude, many entries
    keys = S.rank_keys(x, 0)
    group = int((S.magnitude_bits(x) == int(S.magnitude_bits(x)[10])).sum())
    above = int((x.abs() > 0.01).sum()) + int(x.isnan().sum())
    rank = above + (group if into_group == "last" else into_group)
    kept = keys >= S.kth_largest_key(x, rank, chunk=native.MIN_ELEMENTS)
    assert int(kept.sum()) == rank
    assert int(keys[kept].min()) == int(keys.sort(descending=True).values[rank - 1])


def test_keep_top_values_match_torch(monkeypatch):
    x = awkward(seed=3)
    mags = S.magnitude_bits(x)
    cutoffs = [int(mags[6]) << S.INDEX_BITS,  # every entry equal to the cutoff's magnitude kept
               (int(mags[6]) << S.INDEX_BITS) | ((1 << 32) - 1),  # ... dropped (its index 0 < start)
               int(mags[100]) << S.INDEX_BITS]
    got = [S.keep_top_values(x, 10, c) for c in cutoffs]
    monkeypatch.setenv(native.ENV, "0")
    for g, c in zip(got, cutoffs):
        want = S.keep_top_values(x, 10, c)
        assert g is not None and torch.equal(bits(g), bits(want))


@pytest.mark.parametrize("consensus_method", ["sum", "count"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("weights", [[0.5, 0.3, 0.2], [1.0, 1.0], [0.7000000001, -0.25, 1 / 3, 2.0]])
def test_disjoint_merge_matches_torch(monkeypatch, weights, normalize, consensus_method):
    xs = [awkward(seed=10 + i)[: N // 4 * 4].view(-1, 4) for i in range(len(weights))]
    xs[0][::7] = xs[1][::7] * -1  # exact cancellations in the elected sign's sum
    params = {"weights": weights, "normalize": normalize, "consensus_method": consensus_method}
    native.import_numba()  # disjoint_merge runs as numba's dispatcher, where numba is imported
    assert native._loop("disjoint_merge") is not None
    got = OPS["disjoint_merge"].kernel(KernelContext(), *xs, **params)
    monkeypatch.setenv(native.ENV, "0")
    want = OPS["disjoint_merge"].kernel(KernelContext(), *xs, **params)
    assert torch.equal(bits(got), bits(want))


def test_outside_their_domain_the_loops_decline():
    x = awkward()
    assert native.keep_random(x[: native.MIN_ELEMENTS - 1], 1, 0, 0.5) is None  # too small to pay
    assert native.keep_random(x.double(), 1, 0, 0.5) is None
    assert native.keep_random(x.view(-1, 1).expand(-1, 2), 1, 0, 0.5) is None  # not contiguous
    assert native.keep_at_least(x.half(), 5) is None
    assert not native.high_histogram(x, torch.zeros(1 << 16, dtype=torch.int32), 15)
    assert native.disjoint_merge([x, x[:-1]], [1.0, 1.0], True, False) is None  # shapes differ


def forget_loops(monkeypatch) -> None:
    """The loops are found anew (machine_code's setup too) and restored after the test."""
    monkeypatch.setattr(native, "_found", {})
    monkeypatch.setattr(machine_code, "_state", {})


def test_without_numba_the_torch_path_runs(monkeypatch):
    x = awkward()
    want = native.keep_random(x, 7, 0, 0.5)
    monkeypatch.setitem(sys.modules, "numba", None)  # `import numba` raises ImportError, find_spec finds none
    monkeypatch.delitem(sys.modules, "mergelang.ops.native_loops", raising=False)
    monkeypatch.delattr(mergelang.ops, "native_loops", raising=False)
    monkeypatch.delitem(sys.modules, "mergelang.ops.entry_build", raising=False)
    monkeypatch.delattr(mergelang.ops, "entry_build", raising=False)
    forget_loops(monkeypatch)
    assert native._loop("select_random") is None and native.keep_random(x, 7, 0, 0.5) is None
    got = OPS["keep_random"].kernel(KernelContext(key=7), x, density=0.5, seed=0)
    assert torch.equal(bits(got), bits(want))


def test_with_numba_jit_disabled_the_torch_path_runs(monkeypatch):
    import numba

    monkeypatch.setattr(numba.config, "DISABLE_JIT", True)
    forget_loops(monkeypatch)
    assert native._loop("select_random") is None and native.keep_random(awkward(), 7, 0, 0.5) is None


def test_numba_disable_jit_turns_the_loops_off_before_numba_is_imported(monkeypatch):
    monkeypatch.setenv("NUMBA_DISABLE_JIT", "1")
    monkeypatch.setitem(sys.modules, "numba", None)
    assert native.jit_disabled()
    monkeypatch.setenv("NUMBA_DISABLE_JIT", "0")
    assert not native.jit_disabled()


SPEC = """\
base = model("base")
ft0 = model("ft0")
ft1 = model("ft1")
sparse = [dare(ft0 - base, p=0.5), keep_random(ft1 - base, density=0.3, seed=1)] + base
tied = ties(base, sparse, weights=[0.6, 0.4], density=0.3, global_topk=true)
output avg(tied, ties(base, [ft0, ft1], weights=[0.5, 0.5], density=0.5), dare_linear(base, [ft0, ft1], weights=[1, 1], density=0.2))
"""


def test_merges_are_byte_identical_with_and_without_the_loops(family, tmp_path, monkeypatch):
    spec = write_spec(family, SPEC, "native.ml")
    monkeypatch.setattr(native, "MIN_ELEMENTS", 1)  # the tiny family's chunks take the loops too
    calls = []
    keep_random = native.keep_random
    monkeypatch.setattr(native, "keep_random", lambda *a: calls.append(1) or keep_random(*a))
    outs = {}
    for env in ("1", "0"):
        monkeypatch.setenv(native.ENV, env)
        run(spec, tmp_path / env, RunOptions(seed=5, chunk=300))
        outs[env] = digests(tmp_path / env)
    assert calls and outs["1"] == outs["0"]


@pytest.mark.skipif(importlib.util.find_spec("scipy") is None, reason="scipy is not installed")
def test_loading_the_loops_does_not_import_scipy_linalg():
    """numba probes scipy.linalg for a BLAS when its array functions load (0.21 s here); the loops
    load without it, a loop runs, and scipy.linalg stays importable afterwards."""
    code = (
        "import sys, torch\n"
        "from mergelang.ops import native\n"
        "native._native_loops()\n"  # numba and its loops imported (none linked from stored code)
        "hist = torch.zeros(1 << 16, dtype=torch.int64)\n"
        "assert native.high_histogram(torch.ones(1 << 16), hist, 15) and int(hist.sum()) == 1 << 16\n"
        "print(sorted(m for m in sys.modules if m.startswith('scipy.linalg')))\n"
        "import scipy.linalg.cython_blas\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=Path(mergelang.ops.__file__).parents[2])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("room", [1 << 20, 5000, 23])
@pytest.mark.parametrize("bins", [(0, 0), (-9, 9), None])  # around the bin of 0.01; all bins
def test_counting_and_noting_match_torch(monkeypatch, room, bins):
    """count_noting, in vector code (16 entries at a time) and one entry at a time, against torch:
    the entries above the bracket, and the place and bits of those in it while the notes have room
    (and nothing written past it), continuing the counts and flat indices of the state it is given.
    note_bracket (a first chunk's notes, native and torch) notes the same and counts nothing above."""
    import numpy as np

    from mergelang.ops import native_loops

    x = awkward(seed=6)
    x[10:40] = 0.01  # a group of 16 wholly in the bracket
    at = int(S.magnitude_bits(torch.tensor([0.01]))) >> S.LOW_BITS
    lowest, highest = (0, (1 << 16) - 1) if bins is None else (at + bins[0], at + bins[1])
    edges = [lowest << S.LOW_BITS, (lowest << S.LOW_BITS) - 1, ((highest + 1) << S.LOW_BITS) - 1,
             (highest + 1) << S.LOW_BITS]  # the least and greatest bits of the bracket, and their neighbours
    x[50:54] = torch.tensor([e % (1 << 31) for e in edges], dtype=torch.int32).view(torch.float32)
    m = S.magnitude_bits(x).long()
    high = m >> S.LOW_BITS
    inside = torch.nonzero((high >= lowest) & (high <= highest)).flatten()
    noted = min(room, 3 + inside.numel()) - 3
    assert noted > 0 and (noted < inside.numel()) == (room < inside.numel() + 3)
    ways = ["scalar", "torch", "note", "torch note"] + (["vector"] if native_loops.VECTOR_NOTES else [])
    for way in ways:
        state = torch.tensor([3, 1000, lowest, highest, 7, 1], dtype=torch.int64)
        positions, magnitudes = (torch.full((room + 64,), -1, dtype=torch.int64) for _ in range(2))
        if way.startswith("torch"):
            monkeypatch.setenv(native.ENV, "0")
            (S.note_bracket if way == "torch note" else S.count_noting)(x, state, positions[:room], magnitudes[:room])
            monkeypatch.delenv(native.ENV)
        else:
            loop = {"vector": native_loops._count_noting_vector, "scalar": native_loops._count_noting_scalar,
                    "note": native_loops.note_bracket}[way]
            loop(x.view(torch.int32).numpy().view(np.uint32), state.numpy(), positions[:room].numpy(),
                 magnitudes[:room].numpy(), np.uint32(S.LOW_BITS))
        above = 0 if "note" in way else int((high > highest).sum())
        assert state.tolist() == [3 + inside.numel(), 1000 + x.numel(), lowest, highest, 7 + above, 1], way
        assert torch.equal(positions[3:3 + noted], inside[:noted] + 1000), way
        assert torch.equal(magnitudes[3:3 + noted], m[inside[:noted]]), way
        assert (positions[:3] == -1).all() and (positions[room:] == -1).all(), way
        assert (magnitudes[:3] == -1).all() and (magnitudes[room:] == -1).all(), way


@pytest.mark.parametrize("bound", ["lower", "upper"])
def test_the_first_passs_notes_give_the_torch_cutoff(monkeypatch, bound):
    """A selection whose first pass notes more entries than MIN_ELEMENTS (five values, each shared
    by a fifth of the entries), read back by the native loops and by torch: the same cutoff, where
    the first pass was enough, and it splits a sort of the rank keys at the rank."""
    g = torch.Generator().manual_seed(3)
    x = torch.randint(-2, 3, (8 * native.MIN_ELEMENTS + 5,), generator=g).float() * 0.001
    n = x.numel()
    ordered = torch.sort(S.rank_keys(x, 0), descending=True).values.tolist()
    for rank in (n // 3, n // 2 + 1, n - 7):
        keys = []
        for env in ("1", "0"):
            monkeypatch.setenv(native.ENV, env)
            reducer = S.RankCutoff(KernelContext(), (n,), rank, bound)
            for s in range(0, n, 2 * native.MIN_ELEMENTS):
                reducer.update(0, x[s:s + 2 * native.MIN_ELEMENTS])
            assert reducer.end_pass(0), "the first chunk's bin is the chosen one"
            assert reducer.noted >= native.MIN_ELEMENTS  # the notes went through the native loops
            keys.append(int(reducer.result()))
        assert keys[0] == keys[1], (rank, bound)
        if bound == "lower":  # keeps exactly ranks 1..rank
            assert ordered[rank - 1] >= keys[0] > ordered[rank], rank
        else:  # keeps exactly ranks rank..n
            assert ordered[rank - 2] > keys[0] >= ordered[rank - 1], rank


def test_a_joint_first_chunk_leaves_a_select_as_its_own_loop_would():
    """The first chunk of a select, taken in its own loop (bracket_pass bins it, tapped_chunk notes
    it), in a joint loop (bracket_pass bins it, bracket_binned, bracket_pass again, the count above
    put back) or noted eagerly after the joint loop binned it (note_chunk): the same histogram,
    state and notes, then the same cutoff after the other chunks."""
    from mergelang.ops import native_loops

    x = awkward(8 * native.MIN_ELEMENTS + 5, seed=4).nan_to_num(0.0, 0.0, 0.0)
    n, first = x.numel(), 2 * native.MIN_ELEMENTS
    xbits = x.view(torch.int32).numpy().view(np.uint32)

    def binned(reducer):
        native_loops.bracket_pass(xbits[:first], reducer.hist, reducer.state,  # numpy on the CPU
                                  reducer.positions, reducer.magnitudes, np.uint32(S.LOW_BITS))

    def own(reducer):
        binned(reducer)
        reducer.tapped_chunk(x[:first])

    def joint(reducer):
        binned(reducer)
        put_back = reducer.bracket_binned(first)
        binned(reducer)  # now bracketed: it notes the chunk and counts the entries above
        put_back()

    def eager_notes(reducer):
        binned(reducer)
        put_back = reducer.bracket_binned(first)
        reducer.note_chunk(x[:first])
        put_back()

    for rank in (n // 3, n - 11):
        seen = []
        for way in (own, joint, eager_notes):
            reducer = S.RankCutoff(KernelContext(), (n,), rank)
            reducer.taps(0)  # its buffers
            way(reducer)
            noted = int(reducer.state[S.NOTED])
            assert noted > 0
            seen.append((reducer.hist.copy(), reducer.state.copy(), reducer.positions[:noted].copy(),
                         reducer.magnitudes[:noted].copy()))
            for s in range(first, n, first):
                reducer.update(0, x[s:s + first])
            assert reducer.end_pass(0), "the notes hold rank k: one pass"
            seen[-1] += (int(reducer.result()),)
        for other in seen[1:]:
            assert all(np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b for a, b in zip(seen[0], other)), rank
