"""Counter-based random numbers: a pure function of (key, element index).

A key is derived from (run seed, tensor name, the op's structural digest); element i of a tensor
gets `splitmix64(key + (i + 1) * GOLDEN)`. The result does not depend on chunking, thread count,
evaluation order or device, because every element's value is computed from its own index alone.

torch has no unsigned 64-bit arithmetic, so the mixer runs on int64 with wrapping multiplication
(two's complement: the low 64 bits are the same as unsigned) and logical right shifts done as an
arithmetic shift followed by a mask.
"""

from __future__ import annotations

import hashlib

import torch

MASK64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
MIX1 = 0xBF58476D1CE4E5B9
MIX2 = 0x94D049BB133111EB
# Draws are 53-bit integers, compared against a 53-bit threshold: keep probabilities are exact to 2^-53.
DRAW_BITS = 53


def _signed(x: int) -> int:
    x &= MASK64
    return x - (1 << 64) if x >= 1 << 63 else x


def derive_key(seed: int, tensor_name: str, digest: bytes) -> int:
    """A 64-bit key for one random op applied to one tensor."""
    h = hashlib.sha256()
    h.update(int(seed).to_bytes(16, "little", signed=True))
    h.update(tensor_name.encode())
    h.update(b"\0")
    h.update(digest)
    return int.from_bytes(h.digest()[:8], "little")


def splitmix64(x: int) -> int:
    """Reference implementation on Python integers (used by tests and for documentation)."""
    z = (x + GOLDEN) & MASK64
    z = ((z ^ (z >> 30)) * MIX1) & MASK64
    z = ((z ^ (z >> 27)) * MIX2) & MASK64
    return z ^ (z >> 31)


def _srl(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 values."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def draws(key: int, start: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """53-bit uniform integers (int64) for elements start .. start+count-1 under `key`.

    Element i gets splitmix64(key + i * GOLDEN), the splitmix64 sequence seeded at `key`.
    """
    idx = torch.arange(start, start + count, dtype=torch.int64, device=device)
    z = idx * _signed(GOLDEN) + _signed(key + GOLDEN)
    z = (z ^ _srl(z, 30)) * _signed(MIX1)
    z = (z ^ _srl(z, 27)) * _signed(MIX2)
    z = z ^ _srl(z, 31)
    return _srl(z, 64 - DRAW_BITS)


def threshold(keep_probability: float) -> int:
    """The integer a draw must be below to keep an element with the given probability (exact)."""
    return int(keep_probability * (1 << DRAW_BITS))


def keep_mask(key: int, start: int, count: int, keep_probability: float, device="cpu") -> torch.Tensor:
    """Bernoulli(keep_probability) booleans for elements start .. start+count-1."""
    return draws(key, start, count, device) < threshold(keep_probability)


def reference_draw(key: int, index: int) -> int:
    """What `draws` computes for one element, on Python integers."""
    return splitmix64((key + index * GOLDEN) & MASK64) >> (64 - DRAW_BITS)
