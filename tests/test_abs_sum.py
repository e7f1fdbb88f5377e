"""Exact Σ|x| (ops/abs_sum.py) against math.fsum, for any chunking, native or torch."""

from __future__ import annotations

import math

import pytest
import torch

from mergelang.ops import native
from mergelang.ops.abs_sum import AbsSum


def values(n: int = 3 * native.MIN_ELEMENTS + 11) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, generator=g) * 0.01
    x[::97] = -0.0
    x[1::1001] = 1e-45  # subnormals
    x[2::1003] = -2.0**-126  # the smallest normal
    x[3] = 3e38  # sums far above float32's range stay exact in the bins
    x[4] = -3e38
    x[5::7] = x[5]  # repeated magnitudes
    return x


def total(x: torch.Tensor, chunk: int) -> float:
    s = AbsSum()
    for part in x.reshape(-1).split(chunk):
        s.add(part)
    return s.value()


@pytest.mark.parametrize("native_on", ["1", "0"])
def test_the_sum_is_fsum_for_any_chunking(monkeypatch, native_on):
    monkeypatch.setenv(native.ENV, native_on)
    x = values()
    want = math.fsum(abs(v) for v in x.tolist())
    for chunk in (x.numel(), native.MIN_ELEMENTS, native.MIN_ELEMENTS + 13, 1000):
        assert total(x, chunk) == want, chunk


def test_float_sums_in_other_orders_differ_where_the_exact_sum_does_not():
    """The reason for the bins: float64 sums of the same entries in two orders differ."""
    x = torch.tensor([1.0] * 1000 + [1e17])
    entries = x.abs().tolist()
    forward = backward = 0.0
    for v in entries:
        forward += v
    for v in reversed(entries):
        backward += v
    assert forward != backward
    assert total(x, 3) == total(x.flip(0), 7) == math.fsum(entries)


@pytest.mark.parametrize("native_on", ["1", "0"])
def test_infinities_and_nans(monkeypatch, native_on):
    monkeypatch.setenv(native.ENV, native_on)
    x = values()
    x[100] = -math.inf
    assert total(x, native.MIN_ELEMENTS) == math.inf
    x[150_000] = math.nan  # in another chunk than the infinity
    assert math.isnan(total(x, native.MIN_ELEMENTS))
    assert math.isnan(total(x.flip(0), native.MIN_ELEMENTS))


def test_zero_and_empty():
    assert total(torch.zeros(0), 1) == 0.0
    assert total(torch.tensor([0.0, -0.0]), 1) == 0.0


@pytest.mark.parametrize("native_on", ["1", "0"])
def test_blocks_of_tiny_wide_and_edge_magnitudes(monkeypatch, native_on):
    """The native loop sums most of a block in float64 within 18 binades of its largest entry and
    bins the rest one by one: blocks of only subnormals, of magnitudes over the whole float32 range,
    and of entries on the window's edges all give the exact sum."""
    monkeypatch.setenv(native.ENV, native_on)
    g = torch.Generator().manual_seed(1)
    n = 4 * native.MIN_ELEMENTS
    tiny = torch.randint(1, 1 << 23, (n,), generator=g, dtype=torch.int32).view(torch.float32)  # subnormals
    exponents = torch.randint(-149, 127, (n,), generator=g).to(torch.float32)
    wide = torch.randn(n, generator=g).sign() * torch.exp2(exponents)
    edge = torch.full((n,), 2.0**-18) * torch.randint(1, 4, (n,), generator=g)
    edge[::2048] = 1.0  # every block's largest: 2^-18 is its window's smallest binade, 2^-19 below it
    edge[1::4096] = 2.0**-19 - 2.0**-43
    edge[2050::4096] = 2.0**-18 - 2.0**-42  # the largest magnitude below the window, alone in its blocks
    for x in (tiny, wide, edge, torch.cat([tiny, wide, edge])):
        want = math.fsum(abs(v) for v in x.tolist())
        for chunk in (x.numel(), native.MIN_ELEMENTS + 13):
            assert total(x, chunk) == want
