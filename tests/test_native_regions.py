"""Native regions (native_regions.py) give the bits of the eager executor.

The reference is always the eager path (TensorEvaluator with no fuser). Compiling a region costs
about a second, so few regions are compiled: one graph holding every supported op, a few random
graphs, and the regions of whole merges. The generated source of many more random graphs is run
as plain Python on numpy float32 scalars, which round as the compiled loop does.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_fusion import evaluate, same_bits
from test_optimize import expressions

from conftest import digests, write_spec
from mergelang import fuse, native_regions, rng
from mergelang.api import RunOptions, run
from mergelang.arrays import to_torch
from mergelang.check import TensorPlan
from mergelang.execute import ExecOptions, TensorEvaluator
from mergelang.graph import Node, const, with_random_key
from mergelang.ops import machine_code, native
from mergelang.schedule import region

SHAPE = (64, 33)
NAME = "model.layers.3.mlp.up_proj.weight"


@pytest.fixture(autouse=True)
def small_chunks_and_own_cache(monkeypatch, tmp_path_factory):
    """Regions of the tiny test tensors run natively; generated code goes to a folder of the session."""
    monkeypatch.setattr(native, "MIN_ELEMENTS", 1)
    monkeypatch.setenv("MERGELANG_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "native-cache"))


def _data(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    data = {"a": torch.randn(shape, generator=g) * 0.02,
            "b": (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16),
            "c": (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16),
            "d": (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)}  # finite: for the statistics
    flat = data["a"].view(-1)
    flat[:8] = torch.tensor([0.0, -0.0, 1e-40, -3e38, float("inf"), float("nan"), -float("inf"), 2e-45])
    data["b"].view(-1)[1] = 0.0  # equal magnitudes across models, zeros that never agree in TIES
    data["c"].view(-1)[2:5] = torch.tensor([-0.0, float("nan"), 1e-39])
    data["c"].view(-1)[40:60] = data["c"].view(-1)[20]  # a run of equal magnitudes around a cutoff
    return data


def L(m: str) -> Node:
    return Node("load", (), {"model": m})


def every_op() -> Node:
    """One graph whose output region holds every op native regions support."""
    a, b, c, d = L("a"), L("b"), L("c"), L("d")
    da, db = Node("sub", [a, c]), Node("sub", [b, c])
    top = Node("keep_top", [da, Node("topk_cutoff", [da, const(0.4)])])
    top_c = Node("keep_top", [db, Node("topk_cutoff", [db, const(0.5)])])
    band = Node("keep_band", [da, Node("band_cutoff", [da, const(0.6), const(0.1), const(0.0)]),
                              Node("band_cutoff", [da, const(0.6), const(0.1), const(1.0)])])
    dare = with_random_key(Node("dare", [db, const(0.7), const(0)]))
    rand = with_random_key(Node("keep_random", [da, const(0.3), const(1)]))
    ties = Node("disjoint_merge", [top, dare, rand, const(0.5), const(0.3), const(0.2), const(1.0), const(0.0)])
    count = Node("disjoint_merge", [top_c, dare, const(1.0), const(-1.0), const(0.0), const(1.0)])
    plain = Node("disjoint_merge", [top, rand, band, const(2.0), const(0.5), const(1.0), const(0.0), const(0.0)])
    ws = Node("weighted_sum", [a, b, c, const(0.3), const(0.4), const(0.2), const(1.0)])
    raw = Node("weighted_sum", [a, b, const(0.3), const(-0.3), const(1.0)])  # weights sum to 0: no division
    atleast = Node("keep_at_least", [ws, Node("mean", [Node("abs", [d])])])
    choose = Node("ifelse", [Node("neg", [da]), Node("div", [db, const(3.0)]), const(1.0)])
    dd = Node("sub", [d, b])
    scaled = Node("mul", [Node("abs", [raw]), Node("l1_ratio", [dd, with_random_key(Node("keep_random", [dd, const(0.5), const(2)]))])])
    rest = Node("avg", [ties, count, plain, choose, atleast, scaled, Node("mul", [c, const(0.1)])])
    return Node("add", [Node("sum", [rest, b]), Node("div", [a, ws])])


def native_fuser() -> fuse.Fuser:
    fuser = fuse.Fuser("auto")
    fuser.program = lambda steps, out_dtype=None: None  # nothing for inductor: native loops or eager
    return fuser


def loops_built(fuser: fuse.Fuser) -> list:
    return [loop for loop in fuser.native._loops.values() if loop is not None]


def test_every_op_gives_the_eager_bits_for_any_chunking():
    data = _data(SHAPE)
    graph = every_op()
    for chunk in (33 * 64, 300, 33 * 5):
        fuser = native_fuser()
        expected = evaluate(graph, SHAPE, data, chunk)
        got = evaluate(graph, SHAPE, data, chunk, fuser)
        assert torch.isnan(expected).float().mean() < 0.05  # the special values stay where they are
        assert same_bits(got, expected), chunk
        ops = {s.node.op for (steps, *_), loop in fuser.native._loops.items() if loop for s in steps if s.inputs}
        assert ops >= native_regions.OPS_SUPPORTED, native_regions.OPS_SUPPORTED - ops


def test_keep_band_splits_runs_of_equal_magnitudes_as_the_eager_path():
    """Breadcrumbs' band on values with few magnitudes (long runs of ties at both ends): the loop
    keeps, of the entries equal to an end's magnitude, exactly those the eager masks keep, wherever
    the chunks cut; an end that keeps all or none too."""
    g = torch.Generator().manual_seed(5)
    data = {"a": (torch.randint(-4, 5, SHAPE, generator=g) * 0.25).to(torch.float32),
            "c": (torch.randint(-1, 2, SHAPE, generator=g) * 0.25).to(torch.float32)}
    x = Node("sub", [L("a"), L("c")])
    for density, gamma in ((0.5, 0.1), (0.3, 0.0), (0.9, 0.2), (1.0, 0.1)):
        graph = Node("keep_band", [x, Node("band_cutoff", [x, const(density), const(gamma), const(0.0)]),
                                   Node("band_cutoff", [x, const(density), const(gamma), const(1.0)])])
        kept = set()
        for chunk in (33 * 64, 33 * 7, 33 * 5):
            fuser = native_fuser()
            expected = evaluate(graph, SHAPE, data, chunk)
            assert same_bits(evaluate(graph, SHAPE, data, chunk, fuser), expected), (density, gamma, chunk)
            assert any(s.node.op == "keep_band" for (steps, *_), loop in fuser.native._loops.items() if loop
                       for s in steps)
            kept.add(int((expected != 0).sum()))
        assert len(kept) == 1 and 0 < kept.pop() <= SHAPE[0] * SHAPE[1]


@settings(max_examples=4, deadline=None)
@given(expressions().filter(lambda n: n.op not in ("load", "const")), st.sampled_from([5, 12, 35]))
def test_random_graphs_compiled_give_the_eager_bits(graph, chunk):
    shape = (7, 5)
    data = _data(shape, seed=1)
    try:
        expected = evaluate(graph, shape, data, chunk)
    except ZeroDivisionError:
        return
    fuser = native_fuser()
    assert same_bits(evaluate(graph, shape, data, chunk, fuser), expected), graph
    assert loops_built(fuser)


class _Interpreted:
    """Runs the generated source as Python on numpy scalars (numba.njit replaced by the identity)."""

    def __init__(self):
        self._loops, self._lock = {}, native_regions.threading.Lock()

    def _build(self, steps, kinds, taps, out):
        try:
            source, random_steps = native_regions._generate(steps, kinds, taps, out)
        except native_regions._Unsupported:
            return None
        namespace = {"numba": types.SimpleNamespace(njit=lambda **kw: (lambda f: f))}
        exec(compile(source.replace("import numba\n", ""), "<region>", "exec"), namespace)
        namespace["draw32"] = _draw32  # the loop's draw (a numba intrinsic), in Python
        # called as a loop without stored machine code is: tensors become numpy arrays of their bits
        return machine_code.Dispatched(namespace["region"], native_regions._types(kinds, taps, out)[0]), random_steps


def _draw32(index, k0, k1):
    """native_loops.draw32 in Python: rng's draw under the round keys given."""
    return np.uint32(rng.keyed_draw(int(index), int(k0), int(k1)))


@settings(max_examples=100, deadline=None)
@given(expressions(), st.sampled_from([1, 5, 12, 35]))
def test_generated_code_of_random_graphs_gives_the_eager_bits(graph, chunk):
    shape = (7, 5)
    data = _data(shape, seed=2)
    fuser = native_fuser()
    fuser.native._build = _Interpreted()._build
    try:
        expected = evaluate(graph, shape, data, chunk)
    except ZeroDivisionError:  # constants divided by zero (a user error that check reports)
        return
    with np.errstate(all="ignore"):
        got = evaluate(graph, shape, data, chunk, fuser)
    assert same_bits(got, expected), graph
    assert loops_built(fuser) or graph.op in ("load", "const")


def test_the_region_runs_at_any_offset_in_a_block_of_2_to_the_32(monkeypatch):
    """keep_random's draws for chunks that start near and past 2^32 (the rng's round keys change)."""
    graph = with_random_key(Node("keep_random", [L("a"), const(0.4), const(3)]))
    steps = region(graph)
    x = torch.randn(1000)
    regions = native_regions.NativeRegions()
    for start in (0, (1 << 32) - 1000, 1 << 32, (5 << 32) + 123):
        class Ev:
            row_size, shape, device = 1, (1 << 40,), torch.device("cpu")
            options = types.SimpleNamespace(seed=4)
            tp = TensorPlan(NAME, graph, (1 << 40,), "F32")
            read = types.SimpleNamespace(raw=lambda m, r0, r1, tensor=None: x)

            def load_raw(self, node, r0, r1):
                return x
        got = to_torch(regions.rows_of(Ev(), steps, start, start + 1000))
        key = rng.derive_key(4, NAME, bytes.fromhex(graph.attr("key")))
        keep = rng.keep_mask(key, start, 1000, 0.4)
        assert torch.equal(got.view(torch.int32), torch.where(keep, x, 0.0).view(torch.int32)), start
    assert regions.rows_of(Ev(), steps, (1 << 32) - 10, (1 << 32) + 990) is None  # across two blocks: eager


def test_inputs_the_loop_does_not_take_keep_the_region_eager():
    data = _data((7, 5))
    data["h"] = data["b"].to(torch.float16)
    graph = Node("add", [L("h"), L("a")])  # float16 is not read by the loops
    fuser = native_fuser()
    assert same_bits(evaluate(graph, (7, 5), data, 35, fuser), evaluate(graph, (7, 5), data, 35))
    assert not loops_built(fuser)
    graph = Node("add", [Node("sin", [L("a")]), L("b")])  # an op the loops do not have
    fuser = native_fuser()
    assert same_bits(evaluate(graph, (7, 5), data, 35, fuser), evaluate(graph, (7, 5), data, 35))
    assert not fuser.native._loops and not native_regions.supported(region(graph))


def test_small_chunks_stay_eager(monkeypatch):
    monkeypatch.setattr(native, "MIN_ELEMENTS", 36)
    data = _data((7, 5))
    fuser = native_fuser()
    graph = Node("sub", [L("a"), L("b")])
    assert same_bits(evaluate(graph, (7, 5), data, 35, fuser), evaluate(graph, (7, 5), data, 35))
    assert not fuser.native._loops


def test_without_numba_the_region_stays_eager(monkeypatch):
    monkeypatch.setenv(native.ENV, "0")
    data = _data((7, 5))
    fuser = native_fuser()
    graph = Node("sub", [L("a"), L("b")])
    assert same_bits(evaluate(graph, (7, 5), data, 35, fuser), evaluate(graph, (7, 5), data, 35))
    assert not fuser.native._loops


def test_a_loop_that_fails_to_compile_warns_once_and_runs_eagerly(monkeypatch, caplog):
    def broken(signature):
        raise TypeError("cannot type this")

    region = types.SimpleNamespace(compile=broken)
    monkeypatch.setattr(native_regions, "_load", lambda source: types.SimpleNamespace(region=region))
    monkeypatch.setattr(machine_code, "_read", lambda name: None)  # no machine code stored for it
    data = _data((7, 5))
    fuser = native_fuser()
    graph = Node("mul", [Node("sub", [L("a"), L("b")]), const(3.0)])
    with caplog.at_level(logging.WARNING):
        got = evaluate(graph, (7, 5), data, 10, fuser)
    assert same_bits(got, evaluate(graph, (7, 5), data, 10))
    assert [r.message for r in caplog.records].count(
        "a native region failed to compile, evaluating it eagerly: cannot type this") == 1
    assert list(fuser.native._loops.values()) == [None]


def forget_loaded_regions(monkeypatch) -> None:
    for name in [n for n in sys.modules if n.startswith("mergelang_region_")]:
        monkeypatch.delitem(sys.modules, name)


def test_generated_code_is_kept_in_the_cache_folder_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGELANG_CACHE_DIR", str(tmp_path))
    forget_loaded_regions(monkeypatch)
    source = native_regions._generate(region(Node("sub", [L("a"), L("b")])), ("f32", "bf16"))[0]
    module = native_regions._load(source)
    (path,) = (tmp_path / "regions").glob("mergelang_region_*.py")
    assert path.read_text() == source and module.__file__ == str(path)
    assert native_regions._load(source) is module
    out = np.empty(3, np.float32)
    module.region(3, 0, np.uint64(0), np.zeros(0, np.uint64), np.array([1.0, 2.0, 3.0], np.float32),
                  np.array([0x3F80, 0x4000, 0xBF80], np.uint16), out)  # bf16 1, 2, -1
    assert out.tolist() == [0.0, 0.0, 4.0]


def test_an_unwritable_cache_folder_falls_back_to_the_temporary_folder(tmp_path, monkeypatch):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("MERGELANG_CACHE_DIR", str(blocked))
    forget_loaded_regions(monkeypatch)
    source = native_regions._generate(region(Node("add", [L("a"), L("b")])), ("f32", "f32"))[0]
    module = native_regions._load(source)
    fallback = native_regions._folders()[1]
    assert Path(module.__file__).parent == fallback and not fallback.is_relative_to(blocked)


SPEC = """\
base = model("base")
ft0 = model("ft0")
ft1 = model("ft1")
output avg(ties(base, [ft0, ft1], weights=[0.6, 0.4], density=0.5),
           dare_linear(base, [ft0, ft1], weights=[0.5, 0.5], density=0.3),
           linear([ft0, ft1], weights=[0.3, 0.7]))
"""


def test_merges_are_byte_identical_with_and_without_native_regions(family, tmp_path, monkeypatch):
    spec = write_spec(family, SPEC, "native_regions.ml")
    built = []
    real = native_regions.NativeRegions._build
    monkeypatch.setattr(native_regions.NativeRegions, "_build",
                        lambda self, *args: built.append(real(self, *args)) or built[-1])
    outs = {}
    for mode in ("auto", "never"):
        run(spec, tmp_path / mode, RunOptions(seed=5, chunk=300, compile=mode))
        outs[mode] = digests(tmp_path / mode)
    assert any(b is not None for b in built)
    assert outs["auto"] == outs["never"]


def test_nan_and_signed_zero_bits_survive_a_loop():
    """Bits that arithmetic does not touch pass through as they are (a kept -0.0 stays -0.0)."""
    x = torch.tensor([-0.0, 0.0, float("nan"), -float("inf"), 1e-45] * 7).reshape(7, 5)
    data = {"a": x, "b": torch.zeros(7, 5, dtype=torch.bfloat16), "c": torch.zeros(7, 5, dtype=torch.bfloat16)}
    graph = Node("keep_top", [L("a"), Node("topk_cutoff", [L("a"), const(0.9)])])  # 31 kept: zeros too
    fuser = native_fuser()
    got = evaluate(graph, (7, 5), data, 35, fuser)
    assert loops_built(fuser)
    assert torch.equal(got.view(torch.int32), evaluate(graph, (7, 5), data, 35).view(torch.int32))
    assert got.view(-1)[0].view(torch.int32).item() == -(2**31)  # the first -0.0, kept as it is


@pytest.mark.parametrize("density", [0.5, 0.3])
def test_keep_top_takes_the_fast_loop_except_in_the_chunk_of_the_cutoff(density):
    """Magnitudes from four values only: every chunk holds entries equal to the cutoff's magnitude t,
    those before the cutoff's own entry kept, those after it dropped. Chunks wholly on one side take
    the loop that compares 32-bit magnitudes with one bound; the chunk holding that entry, the loop
    that also compares places. Both give the eager bits, for any chunking."""
    g = torch.Generator().manual_seed(3)
    levels = torch.tensor([0.25, -0.5, 0.5, -1.0, 1.0, 2.0])
    a = levels[torch.randint(0, 6, (40, 9), generator=g)]
    data = {"a": a, "b": torch.zeros(40, 9, dtype=torch.bfloat16)}
    da = Node("sub", [L("a"), L("b")])
    graph = Node("keep_top", [da, Node("topk_cutoff", [da, const(density)])])
    expected = evaluate(graph, (40, 9), data, 360)
    kept = expected != 0
    assert kept.sum() == int(density * 360)
    t = expected.abs()[kept].min()
    assert ((a.abs() == t) & ~kept).any()  # the run of t is split: some kept, some not
    for chunk in (360, 45, 18, 9):
        fuser = native_fuser()
        assert same_bits(evaluate(graph, (40, 9), data, chunk, fuser), expected), chunk
        (steps, kinds, taps, out), = [key for key, loop in fuser.native._loops.items() if loop and not key[2]]
        source, _ = native_regions._generate(steps, kinds, taps, out)
        assert "if fast" in source and "m2 >= u2" in source


def test_a_region_another_thread_is_building_runs_eagerly_meanwhile():
    data = _data((7, 5))
    graph = Node("sub", [L("a"), L("b")])
    fuser = native_fuser()
    kinds = ("f32", "bf16")
    fuser.native._loops[(region(graph), kinds, (), "f32")] = native_regions.BUILDING
    assert same_bits(evaluate(graph, (7, 5), data, 35, fuser), evaluate(graph, (7, 5), data, 35))
    assert fuser.native._loops[(region(graph), kinds, (), "f32")] is native_regions.BUILDING  # not built twice
    del fuser.native._loops[(region(graph), kinds, (), "f32")]
    evaluate(graph, (7, 5), data, 35, fuser)
    assert loops_built(fuser)


def test_a_chunk_that_waits_gets_the_loop_another_thread_is_building():
    """A reduction's first chunk (wait=True) blocks until the build in progress ends, then takes its
    result; without waiting the chunk is left eager."""
    fuser = native_fuser()
    graph = Node("sub", [L("a"), L("b")])
    key = (region(graph), ("f32", "bf16"), (), "f32")
    regions = fuser.native
    with regions._lock:  # another thread's build, in progress
        regions._loops[key] = native_regions.BUILDING
        regions._building = True
    got = []
    waiter = native_regions.threading.Thread(target=lambda: got.append(regions._loop(*key, wait=True)))
    waiter.start()
    assert regions._loop(*key) is None
    waiter.join(0.2)
    assert waiter.is_alive() and not got  # still waiting
    built = (lambda: None, [])
    with regions._lock:  # the build ends
        regions._loops[key] = built
        regions._building = False
        regions._built.notify_all()
    waiter.join(5)
    assert got == [built]


def test_while_another_thread_loads_a_loop_the_others_are_not_waited_for(monkeypatch):
    loaded = native._loop("high_histogram")
    monkeypatch.setattr(native, "_found", {})  # restored after the test
    with native._resolving:  # another thread is linking or compiling a loop
        assert native._loop("high_histogram") is None
    assert type(native._loop("high_histogram")) is type(loaded) is machine_code.Entry


def test_a_loop_writes_into_the_tensor_it_is_given():
    """keep_whole hands the rows of its whole tensor, so that the loop writes there, not into a copy."""
    data = _data((7, 5))
    graph = Node("sub", [L("a"), L("b")])
    fuser = native_fuser()
    whole = torch.full((7, 5), 7.0)
    ev_rows = evaluate(graph, (7, 5), data, 35)  # the eager values

    class Ev:
        row_size, shape, device = 5, (7, 5), torch.device("cpu")
        read = types.SimpleNamespace(raw=lambda m, r0, r1, tensor=None: data[m][r0:r1])

        def load_raw(self, node, r0, r1):
            return data[node.attr("model")][r0:r1]

    part = whole[2:5]
    got = fuser.native.rows_of(Ev(), region(graph), 2, 5, part)
    assert got is part and same_bits(whole[2:5], ev_rows[2:5]) and bool((whole[:2] == 7.0).all())
    odd = torch.empty(3, 5, dtype=torch.float64)  # not float32: a new tensor instead
    assert fuser.native.rows_of(Ev(), region(graph), 2, 5, odd) is not odd


def test_one_loop_is_built_at_a_time_and_the_others_wait_their_turn():
    """A chunk whose loop is not there while another thread builds one waits for that build to end,
    then builds its own (eager, it would import torch: arrays.py); asked not to wait (`rows_of`'s
    wait=False, as tapped.py asks after a first chunk), it is left to the eager path at once."""
    data = _data((7, 5))
    fuser = native_fuser()
    regions = fuser.native
    regions._building = True  # another thread is building a loop
    graph = Node("sub", [L("a"), L("b")])
    ev = TensorEvaluator(TensorPlan(NAME, graph, (7, 5), "F32"), None, ExecOptions(chunk=35))
    ev.read = lambda m, r0, r1, tensor=None: data[m][r0:r1].to(torch.float32)
    ev.read.raw = lambda m, r0, r1, tensor=None: data[m][r0:r1]
    assert regions.rows_of(ev, region(graph), 0, 7) is None and not regions._loops

    def end_build():
        time.sleep(0.2)
        with regions._lock:
            regions._building = False
            regions._built.notify_all()

    ender = threading.Thread(target=end_build)
    began = time.monotonic()
    ender.start()
    got = regions.rows_of(ev, region(graph), 0, 7, wait=True)
    ender.join()
    assert time.monotonic() - began >= 0.2 and loops_built(fuser)
    assert same_bits(to_torch(got), evaluate(graph, (7, 5), data, 35))


def test_a_region_that_stays_eager_reads_its_inputs_once():
    """With the stored dtypes known, the loops decide before reading: a float16 input (no loop for
    it) is read once per chunk, by the eager path, not once more to find its dtype."""
    from mergelang.execute import ExecOptions, TensorEvaluator

    data = _data((7, 5))
    data["h"] = data["b"].to(torch.float16)
    graph = Node("add", [L("h"), L("a")])
    reads = []

    def read(m, r0, r1, tensor=None):
        reads.append(m)
        return data[m][r0:r1].to(torch.float32)

    read.raw = lambda m, r0, r1, tensor=None: (reads.append(m), data[m][r0:r1])[1]
    read.dtype = lambda m, tensor=None: data[m].dtype
    ev = TensorEvaluator(TensorPlan(NAME, graph, (7, 5), "F32"), read, ExecOptions(chunk=10))
    ev.fuser = native_fuser()
    got = torch.cat([ev._as_tensor(ev.rows_of(graph, r0, r1), r1 - r0) for r0, r1 in ev.chunks()])
    assert same_bits(got, evaluate(graph, (7, 5), data, 10))
    assert sorted(reads) == sorted(["h", "a"] * len(list(ev.chunks())))
    assert not ev.fuser.native._loops


def tapped_loops(fuser: fuse.Fuser) -> list:
    return [key for key, loop in fuser.native._loops.items() if loop is not None and loop is not native_regions.BUILDING
            and key[2]]


@pytest.mark.parametrize("min_elements", [1, 200])
def test_a_reduction_pass_inside_its_inputs_loop_gives_the_eager_bits(monkeypatch, min_elements):
    """l1_ratio's sums and topk_cutoff's first histogram are taken by the loop that computes their
    input (tapped.py); the kept value is the loop's output. With 200 entries at
    least, the last chunk of 4 rows (132 entries) runs eagerly, adding to the same sums. A NaN or an
    infinity among the entries makes the sum NaN or infinite, as eagerly."""
    monkeypatch.setattr(native, "MIN_ELEMENTS", min_elements)
    data = _data(SHAPE)
    data["e"], data["f"] = data["d"].clone(), data["d"].clone()
    data["e"].view(-1)[700] = float("inf")
    data["f"].view(-1)[2100] = float("nan")  # in the last chunk
    a, b, c, d = L("a"), L("b"), L("c"), L("d")
    dd, da = Node("sub", [d, b]), Node("sub", [a, c])
    kept = with_random_key(Node("keep_random", [dd, const(0.3), const(1)]))
    merged = Node("add", [Node("mul", [kept, Node("l1_ratio", [dd, kept])]),
                          Node("keep_top", [da, Node("topk_cutoff", [da, const(0.3)])])])
    ratios = [Node("l1_ratio", [x, with_random_key(Node("keep_random", [x, const(0.01), const(2)]))])
              for x in (Node("sub", [L("e"), b]), Node("sub", [L("f"), b]))]
    for chunk in (33 * 20, SHAPE[0] * SHAPE[1]):
        results = []
        for graph in [merged] + ratios:
            fuser = native_fuser()
            expected = evaluate(graph, SHAPE, data, chunk)
            assert same_bits(evaluate(graph, SHAPE, data, chunk, fuser), expected), (graph.op, chunk)
            results.append(expected)
            taps = {loop for key in tapped_loops(fuser) for _, loop, _, _ in key[2]}
            assert taps == ({"abs_sum_bins", "bracket_pass"} if graph is merged else {"abs_sum_bins"}), chunk
        assert torch.isfinite(results[0]).float().mean() > 0.99
        assert torch.isinf(results[1]).all() and torch.isnan(results[2]).all()


def test_a_loop_run_for_its_taps_only_stores_nothing_and_taps_the_same_values():
    """A joint first pass (tapped.py) needs its taps, not the sum of its roots: its loop ("none")
    neither stores nor slices `out`, and hands the taps the values the storing loop hands them. A
    tap on the root itself cannot go without the root's entries."""
    from mergelang.ops.select import HIGH_BITS, LOW_BITS

    a, b, c = L("a"), L("b"), L("c")
    x, y = Node("sub", [a, c]), Node("sub", [b, c])
    steps = region(Node("sum", [x, y]))
    index = {s.node: i for i, s in enumerate(steps)}
    taps = tuple((index[v], "bracket_pass", (LOW_BITS,), (1, 1, 1, 1)) for v in (x, y))
    data = _data(SHAPE, seed=4)
    n = SHAPE[0] * SHAPE[1]
    leaves = [data[s.node.attr("model")].float().reshape(-1).numpy() for s in steps if s.node.op == "load"]
    kinds = tuple("f32" for _ in leaves)
    results = {}
    for out in ("f32", "none"):
        source, _ = native_regions._generate(steps, kinds, taps, out)
        namespace = {"numba": types.SimpleNamespace(njit=lambda **kw: (lambda f: f))}  # run as Python
        exec(compile(source.replace("import numba\n", ""), "<region>", "exec"), namespace)
        arrays = [[np.zeros(1 << HIGH_BITS, np.int64), np.array([0, 0, 1 << HIGH_BITS, 1 << HIGH_BITS, 0, 0]),
                   np.zeros(n, np.int64), np.zeros(n, np.int64)] for _ in taps]
        stored = np.zeros(n if out == "f32" else 0, np.float32)
        namespace["region"](n, 0, np.uint64(0), np.zeros(0, np.uint64), *leaves, stored,
                                    *(a for tap in arrays for a in tap))
        results[out] = arrays
        assert ("O[j] =" in source) == (out == "f32") and ("out[" in source) == (out == "f32")
    assert all(np.array_equal(p, q) for got, want in zip(results["none"], results["f32"]) for p, q in zip(got, want))
    hist = results["none"][0][0]
    assert hist.sum() == n  # the first histogram of x: every entry binned
    root_tap = ((len(steps) - 1, "bracket_pass", (LOW_BITS,), (1, 1, 1, 1)),)
    with pytest.raises(native_regions._Unsupported):
        native_regions._generate(steps, kinds, root_tap, "none")
    assert "O.view(np.uint32)" in native_regions._generate(steps, kinds, root_tap, "f32")[0]


def test_a_reduction_whose_inputs_no_loop_computes_together_is_not_tapped():
    """l1_ratio(x, y) of two unrelated values: no input's region holds the other, the pass is eager."""
    data = _data(SHAPE)
    a, b, c = L("a"), L("b"), L("c")
    x, y = Node("sub", [a, b]), Node("sub", [c, b])
    graph = Node("mul", [x, Node("l1_ratio", [x, y])])
    fuser = native_fuser()
    assert same_bits(evaluate(graph, SHAPE, data, 33 * 20, fuser), evaluate(graph, SHAPE, data, 33 * 20))
    assert loops_built(fuser) and not tapped_loops(fuser)


def test_the_output_region_writes_bfloat16_as_torch_rounds_it():
    """For a bf16 output the loop rounds its results to nearest even itself. A chunk with a NaN
    result is computed again in float32, so that torch picks the NaN's bits as it does eagerly."""
    data = _data(SHAPE)
    graph = every_op()
    expected = evaluate(graph, SHAPE, data, 33 * 64).to(torch.bfloat16)
    for chunk in (33 * 64, 33 * 5):
        fuser = native_fuser()
        got = evaluate(graph, SHAPE, data, chunk, fuser, out_dtype="BF16")
        assert same_bits(got.to(torch.bfloat16).float(), expected.float()), chunk
        assert torch.isnan(expected).any() and (~torch.isnan(expected)).float().mean() > 0.9
        outs = {key[3] for key, loop in fuser.native._loops.items() if loop is not None and key[0][-1].node is graph}
        assert outs == {"bf16", "f32"}, chunk  # the f32 loop for the chunks with a NaN
    x = torch.tensor([1.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8, -(1.0 + 2**-8 + 2**-20), 3.4e38, 1e-40, -0.0])
    x = torch.cat([x, -x, torch.randn(200)]).reshape(-1, 1)  # ties to even, rounding up, overflow, subnormals
    got = evaluate(Node("neg", [L("a")]), (x.shape[0], 1), {"a": x}, 50, native_fuser(), out_dtype="BF16")
    assert got.dtype == torch.bfloat16
    assert torch.equal(got.view(torch.int16), (-x).to(torch.bfloat16).view(torch.int16))
