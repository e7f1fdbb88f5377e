"""Bit-exact replacements for torch.where on float32, several times faster on CPU.

torch.where runs at ~2.5 ms per million elements on the CPUs this was measured on, slower than
the arithmetic around it; selecting through the float bits with integer and/or/not is ~5x faster
and gives identical results (NaNs, infinities and signed zeros included).
"""

from __future__ import annotations

from ..lazy import torch


def _mask(cond: torch.Tensor) -> torch.Tensor:
    """All ones (-1) where cond is true, 0 elsewhere, as int32."""
    m = cond.to(torch.int32)
    m.neg_()
    return m


def _bits(x, like: torch.Tensor) -> torch.Tensor:
    if not torch.is_tensor(x):
        x = torch.tensor(float(x), dtype=torch.float32, device=like.device)
    return x.view(torch.int32)


def _fast(*xs) -> bool:
    return all(not torch.is_tensor(x) or x.dtype == torch.float32 for x in xs)


def zero_unless(keep: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """torch.where(keep, x, 0.0): x where keep, +0.0 elsewhere."""
    if not _fast(x):
        return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))
    m = _mask(keep)
    return (_bits(x, m) & m).view(torch.float32)


def zero_unless_each(keep: torch.Tensor, *xs) -> list[torch.Tensor]:
    """[zero_unless(keep, x) for x in xs], with the mask built once (xs: tensors or numbers)."""
    xs = [x if torch.is_tensor(x) else torch.tensor(float(x), dtype=torch.float32, device=keep.device)
          for x in xs]
    if not _fast(*xs):
        return [zero_unless(keep, x) for x in xs]
    m = _mask(keep)
    return [(_bits(x, m) & m).view(torch.float32) for x in xs]


def select(cond: torch.Tensor, a, b) -> torch.Tensor:
    """torch.where(cond, a, b) for float32 values (tensors that broadcast, or Python numbers)."""
    if not _fast(a, b):
        return torch.where(cond, a, b)
    m = _mask(cond)
    picked = _bits(a, m) & m
    m.bitwise_not_()
    return (picked | (_bits(b, m) & m)).view(torch.float32)
