"""Exact top-k by magnitude (ops/select.py) against torch.kthvalue and a stable-sort reference."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergelang.check import TensorPlan
from mergelang.execute import ExecOptions, evaluate_in_memory
from mergelang.graph import Node, const
from mergelang.ops import OPS, KernelContext
from mergelang.ops import select
from mergelang.ops.select import band_counts, key_index, key_magnitude, kth_largest_key, rank_keys, topk_count

X = Node("load", (), {"model": "x"})


def reference_order(x: torch.Tensor) -> list[int]:
    """Flat indices by descending |x|, equal magnitudes by ascending index (-0.0 equals +0.0)."""
    a = x.reshape(-1).float().abs().tolist()
    return sorted(range(len(a)), key=lambda i: (-a[i], i))


def tensors() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = [
        torch.randn(1000, generator=g),
        torch.randint(-3, 4, (257,), generator=g).float(),  # many ties, zeros
        torch.tensor([0.0, -0.0, 0.0, -0.0]),  # only zeros of both signs
        torch.tensor([-0.0, 1.0, 0.0, -1.0, 1.0]),
        torch.tensor([5.0]),
        torch.tensor([-2.0, 2.0]),
        torch.tensor([1e-45, -1e-45, 1e-40, 0.0, -3e-38]),  # subnormals
        torch.tensor([math.inf, -math.inf, 1.0, -2.0, 3.4e38]),
        (torch.randn(37, 29, generator=g) * 1e-3).to(torch.bfloat16).float(),  # bf16-quantized: ties
    ]
    return out


@pytest.mark.parametrize("noted", [select.POSITIONS, 1], ids=["positions-noted", "third-pass-scan"])
@pytest.mark.parametrize("x", tensors(), ids=lambda t: f"n{t.numel()}")
def test_magnitude_at_each_rank_is_kthvalue(x, noted, monkeypatch):
    monkeypatch.setattr(select, "POSITIONS", noted)
    n = x.numel()
    a = x.reshape(-1).abs()
    order = reference_order(x)
    ranks = sorted({1, 2, n // 3 + 1, n // 2 + 1, n - 1, n} & set(range(1, n + 1)))
    for rank in ranks:
        for chunk in (None, 1 if n < 10 else 7 if n < 300 else 97):
            key = kth_largest_key(x, rank, chunk=chunk)
            assert key_magnitude(key) == torch.kthvalue(a, n - rank + 1).values.item()
            # the lower cutoff keeps exactly the first `rank` entries of the reference order
            kept = (rank_keys(x, 0) >= key).nonzero().view(-1).tolist()
            assert sorted(kept) == sorted(order[:rank]), (rank, chunk)
            upper = kth_largest_key(x, rank, "upper", chunk=chunk)
            kept = (rank_keys(x, 0) <= upper).nonzero().view(-1).tolist()
            assert sorted(kept) == sorted(order[rank - 1:]), (rank, chunk)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(width=32, allow_nan=False), min_size=1, max_size=40), st.data())
def test_property_select_matches_kthvalue(values, data):
    x = torch.tensor(values, dtype=torch.float32)
    n = x.numel()
    rank = data.draw(st.integers(1, n))
    key = kth_largest_key(x, rank, chunk=data.draw(st.sampled_from([None, 1, 3])))
    assert key_magnitude(key) == torch.kthvalue(x.abs(), n - rank + 1).values.item()
    kept = (rank_keys(x, 0) >= key).nonzero().view(-1).tolist()
    assert sorted(kept) == sorted(reference_order(x)[:rank])


def test_keys_order_by_magnitude_then_lower_index():
    x = torch.tensor([[0.5, -1.0, 0.5], [-0.0, 1.0, 0.25]])
    keys = rank_keys(x, 0)
    assert torch.argsort(keys, descending=True).tolist() == [1, 4, 0, 2, 5, 3]
    assert key_index(int(keys[4])) == 4 and key_magnitude(int(keys[4])) == 1.0
    # a chunk's keys continue the whole tensor's indices
    assert torch.equal(rank_keys(x.reshape(-1)[3:], 3), keys[3:])


def passes(x: torch.Tensor, rank: int, bound: str = "lower", chunk: int | None = None) -> tuple[int, int]:
    """(passes over x the select made, the cutoff it found), fed in chunks of `chunk` entries."""
    reducer = select.RankCutoff(KernelContext(), (x.numel(),), rank, bound)
    step = chunk or x.numel()
    p = 0
    while True:
        for s in range(0, x.numel(), step):
            reducer.update(p, x[s:s + step])
        if reducer.end_pass(p):
            return p + 1, int(reducer.result().item())
        p += 1


def test_one_pass_when_the_first_chunk_points_to_the_bin(monkeypatch):
    distinct = torch.arange(1.0, 101.0)
    assert passes(distinct, 30) == (1, kth_largest_key(distinct, 30, chunk=7))
    assert key_magnitude(passes(distinct, 30)[1]) == 71.0
    ties = torch.tensor([3.0, 1.0, 2.0, 2.0, 2.0, 0.5])
    # descending: 3, then the three 2s (indices 2, 3, 4, alone in their high bin), then 1 and 0.5;
    # the first pass noted where the three 2s are
    for rank, bound, index in ((4, "lower", 4), (2, "lower", 2), (3, "lower", 3), (2, "upper", 2), (3, "upper", 3)):
        count, key = passes(ties, rank, bound)
        assert count == 1 and key_magnitude(key) == 2.0, (rank, bound)
        kept = (rank_keys(ties, 0) >= key) if bound == "lower" else (rank_keys(ties, 0) <= key)
        assert sorted(kept.nonzero().view(-1).tolist()) == sorted(
            reference_order(ties)[:rank] if bound == "lower" else reference_order(ties)[rank - 1:]), (rank, bound)
        assert index in kept.nonzero().view(-1).tolist()


def test_one_pass_over_many_chunks_when_rank_k_falls_among_the_notes():
    """Chunks after the first are counted and noted, not binned: where rank k falls among the noted
    entries, one pass gives a cutoff that splits a sort of the rank keys at rank k, whether the
    bracket is one bin or several."""
    g = torch.Generator().manual_seed(5)
    block = torch.randn(1000, generator=g) * 0.01
    x = block.repeat(20) * torch.where(torch.arange(20000) % 3 == 0, -1.0, 1.0)  # each magnitude 20 times
    ordered = torch.sort(rank_keys(x, 0), descending=True).values
    for rank in (200, 7000, 10000, 19001):
        for chunk in (1000, 4000):  # every chunk holds the same magnitudes: the first points right
            reducer = select.RankCutoff(KernelContext(), (x.numel(),), rank)
            for s in range(0, x.numel(), chunk):
                reducer.update(0, x[s:s + chunk])
            assert int(reducer.state[select.ABOVE]) > 0 or rank < 300
            assert reducer.end_pass(0), (rank, chunk)
            assert int(ordered[rank - 1]) >= int(reducer.result()) > int(ordered[rank]), (rank, chunk)
    # a bracket of several bins: distinct magnitudes spread over many bins, few per bin
    spread = torch.linspace(1.0, 2.0, 4096)[torch.randperm(4096, generator=g)]
    reducer = select.RankCutoff(KernelContext(), (4096,), 2048)
    for s in range(0, 4096, 1024):
        reducer.update(0, spread[s:s + 1024])
    lowest, highest = (int(v) for v in reducer.state[[select.LOWEST, select.HIGHEST]])
    assert highest > lowest
    assert reducer.end_pass(0)
    ordered = torch.sort(rank_keys(spread, 0), descending=True).values
    assert int(ordered[2047]) >= int(reducer.result()) > int(ordered[2048])


def test_two_more_passes_when_the_first_chunk_misleads_and_a_third_for_a_bin_too_large_to_note(monkeypatch):
    # the first chunk's values all lie below the rest: the bracket it points to is far from rank 30's,
    # and the later chunks were counted, not binned: the high histogram, then the low one
    skewed = torch.cat([torch.arange(1.0, 51.0), torch.arange(1001.0, 1051.0)])
    count, key = passes(skewed, 30, chunk=50)
    assert count == 3 and key == passes(skewed, 30)[1] and key_magnitude(key) == 1021.0
    ties = torch.tensor([3.0, 1.0, 2.0, 2.0, 2.0, 0.5])
    monkeypatch.setattr(select, "POSITIONS", 2)  # too few places for the bin of the 2s
    assert passes(ties, 4)[0] == 2  # all three 2s are kept: no scan
    assert passes(ties, 2)[0] == 3  # one of the three 2s is kept: find its index
    assert passes(ties, 3)[0] == 3
    assert passes(ties, 2, "upper")[0] == 2  # rank 2 is the first 2: every 2 is at or below it
    assert passes(ties, 3, "upper")[0] == 3
    for rank, bound in ((4, "lower"), (2, "lower"), (3, "lower"), (2, "upper"), (3, "upper")):
        monkeypatch.setattr(select, "POSITIONS", 2)
        narrow = passes(ties, rank, bound)[1]
        monkeypatch.setattr(select, "POSITIONS", 1 << 20)
        assert narrow == passes(ties, rank, bound)[1], (rank, bound)


def run(graph: Node, x: torch.Tensor, chunk: int = 1 << 20) -> torch.Tensor:
    tp = TensorPlan("t.weight", graph, tuple(x.shape), "F32")
    return evaluate_in_memory(tp, {"x": x}, ExecOptions(chunk=chunk))


def keep_top(density: float) -> Node:
    return Node("keep_top", [X, Node("topk_cutoff", [X, const(density)])])


def keep_band(density: float, gamma: float) -> Node:
    ends = [Node("band_cutoff", [X, const(density), const(gamma), const(float(i))]) for i in (0, 1)]
    return Node("keep_band", [X, *ends])


def expected_kept(x: torch.Tensor, first: int, last: int) -> torch.Tensor:
    """x with only the entries of reference ranks first..last (1-based) kept."""
    keep = torch.zeros(x.numel(), dtype=torch.bool)
    keep[reference_order(x)[first - 1:last]] = True
    return torch.where(keep.view(x.shape), x, torch.zeros(()))


@pytest.mark.parametrize("x", tensors()[:4] + tensors()[-1:], ids=lambda t: f"n{t.numel()}")
@pytest.mark.parametrize("density", [0.01, 0.3, 0.5, 0.99, 1.0])
def test_keep_top_keeps_exactly_k_through_the_executor(x, density):
    k = topk_count(x.numel(), density)
    assert k == (x.numel() if density >= 1 else max(1, int(density * x.numel())))
    want = expected_kept(x, 1, k)
    for chunk in (1 << 20, 1 if x.numel() < 10 else 97):
        got = run(keep_top(density), x, chunk)
        assert torch.equal(got, want)


@pytest.mark.parametrize("x", tensors()[:2] + tensors()[-1:], ids=lambda t: f"n{t.numel()}")
@pytest.mark.parametrize("density,gamma", [(0.5, 0.01), (0.3, 0.1), (0.9, 0.2), (0.001, 0.0), (1.0, 0.5)])
def test_keep_band_keeps_ranks_after_the_outliers(x, density, gamma):
    n = x.numel()
    cut, kept = band_counts(n, density, gamma)
    want = expected_kept(x, cut + 1, cut + kept)
    for chunk in (1 << 20, 97):
        assert torch.equal(run(keep_band(density, gamma), x, chunk), want)


def test_band_with_no_outlier_cut_keeps_the_top():
    """int(gamma * n) = 0: the band is the plain top k (mergekit before 0.1.5 kept nothing here)."""
    x = torch.tensor([0.5, -0.25, 0.125, 1.0, 0.0, -2.0])
    assert band_counts(6, 0.5, 0.01) == (0, 3)
    assert run(keep_band(0.5, 0.01), x).tolist() == [0.5, 0.0, 0.0, 1.0, 0.0, -2.0]


def test_registry_entries():
    assert OPS["topk_cutoff"].kind == "reduce" and OPS["band_cutoff"].kind == "reduce"
    assert OPS["topk_cutoff"].params[0].check(0.0) == "must be in (0, 1]"
    assert OPS["band_cutoff"].param("gamma").check(1.5) == "must be in [0, 1]"
    assert OPS["band_cutoff"].param("bound").choices == ("lower", "upper")


@pytest.mark.parametrize("chunk", [1, 7, 64, 1 << 20])
def test_keep_top_bits_in_every_chunk(chunk):
    """keep_top per chunk (the integer-mask path and the chunk holding the cut): the kept entries'
    own bits, +0.0 for the rest (never -0.0), NaN and infinities included, against reference_order."""
    g = torch.Generator().manual_seed(3)
    x = torch.randint(-4, 5, (300,), generator=g).float() / 4  # many ties, zeros
    x[::11] = -0.0
    x[[5, 50]] = torch.tensor([math.inf, -math.inf])
    kernel = OPS["keep_top"].kernel
    for rank in (1, 3, 100, 150, 299, 300):
        key = kth_largest_key(x, rank)
        kept = set(reference_order(x.nan_to_num(nan=math.inf))[:rank])
        want = torch.tensor([x[i].item() if i in kept else 0.0 for i in range(x.numel())]).view(torch.int32)
        got = torch.cat([kernel(KernelContext(start=s), x[s:s + chunk], torch.tensor(key))
                         for s in range(0, x.numel(), chunk)])
        assert torch.equal(got.view(torch.int32), want), rank


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=1, max_size=40), st.data())
def test_picks_find_the_bin_of_each_rank_and_the_rank_within_it(counts, data):
    """_picks against the histogram written out as its values, largest first: the value of rank r
    (1-based) is its bin, and its rank within the bin is r minus the entries of larger bins. Empty
    bins, the first and last rank, and several ranks at once."""
    total = sum(counts)
    if total == 0:
        return
    values = sorted((b for b, c in enumerate(counts) for _ in range(c)), reverse=True)
    ranks = [1, total] + data.draw(st.lists(st.integers(1, total), max_size=4))
    got = select._picks(torch.tensor(counts, dtype=torch.int64), ranks)
    want = [(values[r - 1], r - sum(1 for v in values if v > values[r - 1])) for r in ranks]
    assert got == want
    assert [select._pick(torch.tensor(counts, dtype=torch.int64), r) for r in ranks] == want
