"""Compiled regions (fuse.py) give the bytes of the eager executor.

The reference is always the eager path (TensorEvaluator with no fuser). Compiling costs seconds per
region, so the compiled checks use few regions: one graph holding every fusable op (inputs in
bf16, f16 and f32, several chunk sizes: dynamic shapes, no recompiles) and a few random graphs.
The generated code of many more random graphs is checked without compiling (the traceable twins of
the per-chunk ops are plain torch code that must equal the registry's kernels).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_optimize import expressions

from mergelang import fuse, rng
from mergelang.check import TensorPlan
from mergelang.execute import ExecOptions, TensorEvaluator
from mergelang.graph import Node, const, with_random_key
from mergelang.io import DTYPES as DTYPES_BY_CODE
from mergelang.schedule import region

NAME = "model.layers.3.mlp.up_proj.weight"
SHAPE = (7, 5)
DTYPES = {"a": torch.float32, "b": torch.bfloat16, "c": torch.float16}


def _data(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    data = {m: (torch.randn(shape, generator=g) * 0.02).to(dt) for m, dt in DTYPES.items()}
    flat = data["a"].view(-1)
    flat[:6] = torch.tensor([0.0, -0.0, 1e-30, -3e38, float("inf"), float("nan")])
    data["b"].view(-1)[1] = 0.0  # equal magnitudes across models, zeros that never agree in TIES
    data["c"].view(-1)[2] = -0.0
    return data


def evaluate(graph: Node, shape, data, chunk: int, fuser=None, seed: int = 9, out_dtype=None) -> torch.Tensor:
    """The whole tensor through the executor's chunk loop; loads read as stored when fused."""
    ev = TensorEvaluator(TensorPlan(NAME, graph, shape, "F32"), None, ExecOptions(seed=seed, chunk=chunk))
    read = lambda m, r0, r1, tensor=None: data[m][r0:r1].to(torch.float32)  # noqa: E731
    read.raw = lambda m, r0, r1, tensor=None: data[m][r0:r1]
    ev.read, ev.fuser, ev.out_dtype = read, fuser, out_dtype
    return torch.cat([ev._as_tensor(ev.rows_of(graph, r0, r1), r1 - r0) for r0, r1 in ev.chunks()])


def same_bits(x: torch.Tensor, y: torch.Tensor) -> bool:
    """The same bytes, except that a NaN may be another NaN: which operand's NaN an `a + b` returns
    depends on the machine code (the eager path itself differs there between chunk sizes)."""
    nan = torch.isnan(x)
    return (x.shape == y.shape and torch.equal(nan, torch.isnan(y))
            and torch.equal(x.view(torch.int32)[~nan], y.view(torch.int32)[~nan]))


def L(m: str) -> Node:
    return Node("load", (), {"model": m})


def every_op() -> Node:
    """One graph that uses every fusable op (so one compile covers them all)."""
    a, b, c = L("a"), L("b"), L("c")
    da, db = Node("sub", [a, c]), Node("sub", [b, c])
    top = Node("keep_top", [da, Node("topk_cutoff", [da, const(0.4)])])
    band = Node("keep_band", [db, Node("band_cutoff", [db, const(0.6), const(0.1), const(0.0)]),
                              Node("band_cutoff", [db, const(0.6), const(0.1), const(1.0)])])
    dare = with_random_key(Node("dare", [db, const(0.7), const(0)]))
    rand = with_random_key(Node("keep_random", [da, const(0.3), const(1)]))
    ties = Node("disjoint_merge", [top, dare, rand, const(0.5), const(0.3), const(0.2), const(1.0), const(0.0)])
    count = Node("disjoint_merge", [band, dare, const(1.0), const(-1.0), const(0.0), const(1.0)])
    ws = Node("weighted_sum", [a, b, c, const(0.3), const(0.4), const(0.2), const(1.0)])
    mask = Node("top_mask", [db, Node("nonzero_topk_cutoff", [db, const(0.5)])])
    cmp = Node("add", [Node("greater", [da, db]), Node("greater_equal", [const(0.0), db])])
    pick = Node("where", [Node("nonzero_mask", [da, const(0.01)]), Node("clamp", [db, const(-0.01), const(0.02)]),
                          Node("abs", [da])])
    atleast = Node("keep_at_least", [ws, Node("mean", [Node("abs", [ws])])])
    choose = Node("ifelse", [Node("neg", [pick]), Node("div", [pick, const(3.0)]), const(1.0)])
    rest = Node("avg", [ties, count, mask, cmp, choose, atleast, Node("mul", [c, const(0.1)])])
    return Node("add", [Node("sum", [rest, Node("count", [a, b, c])]), Node("div", [a, ws])])


class RootOnly(fuse.Fuser):
    """Compiles only the region under `root` (the others, simple ones, run their generated code)."""

    root: Node

    def program(self, steps, out_dtype=None):
        if steps[-1].node is not self.root:
            return _generated(steps, out_dtype)
        return super().program(steps, out_dtype)


def test_every_op_compiled_gives_the_eager_bits_for_any_chunking():
    shape = (64, 33)
    data = _data(shape)
    graph = every_op()
    fuser = RootOnly("always")
    fuser.root = graph
    for chunk in (33 * 64, 300, 33 * 5):
        expected = evaluate(graph, shape, data, chunk)
        got = evaluate(graph, shape, data, chunk, fuser)
        assert same_bits(got, expected), chunk
    programs = [p for p in fuser.programs.values() if isinstance(p, fuse.Compiled)]
    assert len(programs) == 1 and not programs[0].failed
    root = programs[0]
    assert {s.node.op for s in root.program.steps if s.inputs} >= {"disjoint_merge", "dare", "keep_random",
                                                                   "keep_top", "keep_band", "top_mask"}


@settings(max_examples=2, deadline=None)
@given(expressions().filter(lambda n: n.op not in ("load", "const")), st.sampled_from([5, 12, 35]))
def test_random_graphs_compiled_give_the_eager_bits(graph, chunk):
    data = _data(SHAPE, seed=1)
    try:
        expected = evaluate(graph, SHAPE, data, chunk)
    except ZeroDivisionError:
        return
    fuser = fuse.Fuser("always")
    got = evaluate(graph, SHAPE, data, chunk, fuser)
    assert same_bits(got, expected), graph
    compiled = [p for p in fuser.programs.values() if p is not None]
    assert compiled and not any(p.failed for p in compiled)


class _Plain:
    """A region's generated function run by eager torch: checks the code, not inductor."""

    def __init__(self, program: fuse.RegionProgram):
        self.program, self.failed = program, False

    def __call__(self, leaves, keys, start):
        return self.program.function(leaves, keys, start)


@settings(max_examples=150, deadline=None)
@given(expressions(), st.sampled_from([1, 5, 12, 35]))
def test_generated_code_of_random_graphs_gives_the_eager_bits(graph, chunk):
    data = _data(SHAPE, seed=2)
    fuser = fuse.Fuser("always")
    fuser.program = _generated
    try:
        expected = evaluate(graph, SHAPE, data, chunk)
    except ZeroDivisionError:  # constants divided by zero (a user error that check reports)
        with pytest.raises(ZeroDivisionError):
            evaluate(graph, SHAPE, data, chunk, fuser)
        return
    assert same_bits(evaluate(graph, SHAPE, data, chunk, fuser), expected), graph


def _generated(steps, out_dtype=None):
    if not fuse.fusable(steps):
        return None
    return _Plain(fuse.RegionProgram(steps, DTYPES_BY_CODE[out_dtype] if out_dtype else None))


def test_generated_code_of_every_op_gives_the_eager_bits():
    shape = (64, 33)
    data = _data(shape, seed=3)
    fuser = fuse.Fuser("always")
    fuser.program = _generated
    for chunk in (1, 300, 33 * 64):
        assert same_bits(evaluate(every_op(), shape, data, chunk, fuser), evaluate(every_op(), shape, data, chunk))


def test_rng_twin_matches_rng_anywhere_in_a_block_of_2_to_the_32():
    key = rng.derive_key(5, NAME, b"digest")
    for start in (0, 12345, (1 << 31) - 100, (1 << 32) - 300, (1 << 32) + 7, (5 << 32) + (1 << 31) - 3):
        n = 300
        k0, k1 = rng._round_keys(key, start >> 32)
        t = lambda v: torch.tensor(v, dtype=torch.int64)  # noqa: E731
        got = fuse._draws(n, t(start), t(k0), t(k1), "cpu")
        assert torch.equal(got, rng.draws(key, start, n))
        assert got[0].item() == rng.reference_draw(key, start)


def test_a_chunk_across_two_rng_blocks_is_evaluated_eagerly():
    graph = with_random_key(Node("dare", [L("a"), const(0.5), const(0)]))

    class Ev:
        row_size = 1 << 20
        cache: dict = {}
        tp = TensorPlan(NAME, graph, (1 << 13, 1 << 20), "F32")
    steps = region(graph)
    fuser = fuse.Fuser("always")
    fuser.program = lambda s, out_dtype=None: _Plain(fuse.RegionProgram(s))
    assert fuser.rows_of(Ev(), steps, 4095, 4097) is None  # these rows hold elements 2^32 - 2^20 .. 2^32 + 2^20


def test_a_region_over_a_view_of_a_whole_value_gives_the_eager_bits():
    """Rows [0, n) of an n-row input are a view of the same shape; inductor miscompiled a region
    over one (every entry of a dare came out -0.0) until leaves were passed as tensors of their own."""
    graph = Node("neg", [Node("avg", [with_random_key(Node("dare", [L("a"), const(0.5), const(0)]))])])
    data = _data(SHAPE, seed=1)
    fuser = fuse.Fuser("always")
    assert same_bits(evaluate(graph, SHAPE, data, SHAPE[0] * SHAPE[1], fuser),
                     evaluate(graph, SHAPE, data, SHAPE[0] * SHAPE[1]))


def test_ops_without_a_traceable_kernel_keep_their_region_eager():
    graph = Node("add", [Node("sin", [L("a")]), L("b")])
    fuser = fuse.Fuser("always")
    data = _data(SHAPE)
    assert same_bits(evaluate(graph, SHAPE, data, 10, fuser), evaluate(graph, SHAPE, data, 10))
    assert all(p is None for p in fuser.programs.values())
    assert not fuse.fusable(region(graph))


def test_a_region_that_fails_to_compile_runs_its_code_eagerly(monkeypatch):
    def broken(function, **kw):
        def run(*args):
            raise RuntimeError("no compiler")
        return run

    monkeypatch.setattr(fuse.torch, "compile", broken)  # fuse reads torch through lazy.torch
    graph = with_random_key(Node("dare", [Node("sub", [L("a"), L("b")]), const(0.5), const(0)]))
    fuser = fuse.Fuser("always")
    data = _data(SHAPE)
    assert same_bits(evaluate(graph, SHAPE, data, 10, fuser), evaluate(graph, SHAPE, data, 10))
    (compiled,) = [p for p in fuser.programs.values() if p is not None]
    assert compiled.failed


def test_cost_model_compiles_only_when_the_elements_pay(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    graph = Node("add", [L("a"), L("b")])
    program = fuse.RegionProgram(region(graph))
    assert program.work == 3
    steps_cost = 3 * fuse.SAVED_PER_ELEMENT_STEP_S  # two loads and an add
    monkeypatch.setattr(fuse, "_compiled_in_process", True)
    cold = math.ceil(fuse.COLD_COMPILE_S / steps_cost)
    warm = math.ceil(fuse.WARM_COMPILE_S / steps_cost)
    assert not fuse.Fuser("auto", {graph: cold - 1}).worth(program)
    assert fuse.Fuser("auto", {graph: cold + 1}).worth(program)
    assert not fuse.Fuser("auto", {graph: warm + 1}).worth(program)
    fuse._marker(program.digest).parent.mkdir(parents=True)
    fuse._marker(program.digest).touch()  # compiled before: inductor's cache holds it
    assert fuse.Fuser("auto", {graph: warm + 1}).worth(program)
    assert not fuse.Fuser("auto", {graph: warm + 1}, {graph: 2}).worth(program)  # 1-D and 2-D tensors
    assert fuse.Fuser("auto", {graph: 2 * warm + 1}, {graph: 2}).worth(program)
    monkeypatch.setattr(fuse, "_compiled_in_process", False)  # dynamo and inductor still to import
    assert not fuse.Fuser("auto", {graph: 2 * warm + 1}, {graph: 2}).worth(program)
    assert fuse.Fuser("always", {}).worth(program) and not fuse.Fuser("never", {graph: 1 << 40}).worth(program)


def test_a_run_compiles_only_where_some_region_repays_a_cold_compile(tmp_path, monkeypatch):
    """Below that, nothing compiles (not even a region in the cache) and tensors run side by side."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(fuse, "_compiled_in_process", True)
    graph = Node("add", [L("a"), L("b")])
    program = fuse.RegionProgram(region(graph))
    cold = math.ceil(fuse.COLD_COMPILE_S / (3 * fuse.SAVED_PER_ELEMENT_STEP_S))
    fuse._marker(program.digest).parent.mkdir(parents=True)
    fuse._marker(program.digest).touch()
    small = fuse.Fuser("auto", {graph: cold - 1})
    assert small.worth(program) and not small.may_compile()  # a cached compile would pay, but the run stays eager
    assert small.program(region(graph)) is None
    assert fuse.Fuser("auto", {graph: cold + 1}).may_compile()
    monkeypatch.setattr(fuse, "_compiled_in_process", False)
    assert not fuse.Fuser("auto", {graph: cold + 1}).may_compile()  # importing dynamo costs too
    assert fuse.Fuser("always", {}).may_compile() and not fuse.Fuser("never", {graph: 1 << 40}).may_compile()


def test_compile_mode_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv(fuse.ENV, "always")
    assert fuse.default_mode() == "always"
    monkeypatch.setenv(fuse.ENV, "sometimes")
    try:
        fuse.default_mode()
    except ValueError as e:
        assert str(e) == "MERGELANG_COMPILE must be one of auto, always, never, got 'sometimes'"
    else:
        raise AssertionError("an unknown mode must be refused")


def test_plan_elements_count_every_tensor_sharing_a_region():
    a, b = L("a"), L("b")
    delta = Node("sub", [a, b])
    ties_like = Node("add", [b, Node("keep_top", [delta, Node("topk_cutoff", [delta, const(0.5)])])])
    plain = Node("add", [a, b])
    plan = type("Plan", (), {"tensors": [TensorPlan("x", ties_like, (4, 3), "F32"),
                                         TensorPlan("y", ties_like, (5,), "F32"),
                                         TensorPlan("z", plain, (2, 2), "F32")]})()
    fuser = fuse.Fuser.for_plan(plan, "auto")
    assert fuser.elements == {ties_like: 17, delta: 17, plain: 4}
    assert fuser.variants == {ties_like: 2, delta: 2, plain: 1}


def test_run_compiled_writes_the_bytes_of_run_eager(family, tmp_path, caplog):
    import logging

    from click.testing import CliRunner
    from oracle import load_folder

    from mergelang.cli import main

    spec = tmp_path / "spec.ml"
    spec.write_text(f'base = model("{family / "base"}")\nft = model("{family / "ft0"}")\n'
                    # a load inside layer_range reads another layer's tensor: the compiled path too
                    "output stack(layer_range(0.5 * base + 0.5 * ft, 1, 2), "
                    "layer_range(base + dare(ft - base, p=0.5), 0, 2))\n")
    outs = {}
    for mode in ("never", "always"):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger=fuse.log.name):
            result = CliRunner().invoke(main, ["run", str(spec), "-o", str(tmp_path / mode), "-q", "--compile", mode],
                                        catch_exceptions=False)
        assert result.exit_code == 0, result.output
        outs[mode] = load_folder(tmp_path / mode)
        # the compiled run did compile (no region fell back to eager): else this compares eager with eager
        compiled = [r.getMessage() for r in caplog.records if r.getMessage().startswith("compiled a region")]
        assert (len(compiled) > 0) == (mode == "always"), mode
        assert not any("compiling a region failed" in r.getMessage() for r in caplog.records)
    assert outs["never"].keys() == outs["always"].keys()
    for name, eager in outs["never"].items():
        assert torch.equal(eager.view(torch.int16), outs["always"][name].view(torch.int16)), name


def test_marker_folder_is_inductors_cache_folder(tmp_path, monkeypatch):
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    assert str(fuse._cache_dir()) == cache_dir()
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "c"))
    assert fuse._cache_dir() == tmp_path / "c" and str(fuse._cache_dir()) == cache_dir()


def test_run_refuses_an_unknown_compile_mode_from_the_environment(family, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from mergelang.cli import main

    spec = tmp_path / "spec.ml"
    spec.write_text(f'output model("{family / "base"}")\n')
    monkeypatch.setenv(fuse.ENV, "yes")
    result = CliRunner().invoke(main, ["run", str(spec), "-o", str(tmp_path / "out"), "-q"])
    assert result.exit_code == 2
    assert "MERGELANG_COMPILE must be one of auto, always, never, got 'yes'" in result.output
    assert not (tmp_path / "out").exists()
