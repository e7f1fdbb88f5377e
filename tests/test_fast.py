"""The bit-level selections give exactly what torch.where gives (NaN, inf, signed zeros, broadcasting)."""

import torch

from mergelang.ops.fast import select, zero_unless

SPECIAL = torch.tensor([0.0, -0.0, 1.5, -2.0, float("inf"), -float("inf"), float("nan"), 1e-40])


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.int32), b.contiguous().view(torch.int32))


def test_zero_unless_matches_where():
    x = SPECIAL.repeat(8).view(8, 8)
    keep = torch.rand(8, 8, generator=torch.Generator().manual_seed(0)) > 0.5
    assert same_bits(zero_unless(keep, x), torch.where(keep, x, torch.tensor(0.0)))
    row = keep[:, :1]  # a row-wise mask broadcasts
    assert same_bits(zero_unless(row, x), torch.where(row, x, torch.tensor(0.0)))


def test_select_matches_where():
    a = SPECIAL.repeat(8).view(8, 8)
    b = a.flip(1)
    cond = torch.rand(8, 8, generator=torch.Generator().manual_seed(1)) > 0.5
    assert same_bits(select(cond, a, b), torch.where(cond, a, b))
    assert same_bits(select(cond, 1.0, -1.0), torch.where(cond, 1.0, -1.0))
    assert same_bits(select(cond, a, 0.25), torch.where(cond, a, torch.tensor(0.25)))
    scalar_cond = torch.tensor(True)  # a 0-d condition broadcasts against the values
    assert same_bits(select(scalar_cond, a, b), a)
