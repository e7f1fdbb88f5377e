"""Counter-based random numbers: a pure function of (key, element index).

A key is derived from (run seed, tensor name, the op's structural digest). Element i gets a 32-bit
draw from a keyed integer mixer applied to i: two xor-shift-multiply rounds (the "lowbias32"
finalizer constants), with key material injected before each round. The result does not depend
on chunking, thread count, evaluation order or device, because every element's value is
computed from its own index alone.

Why 32-bit lanes: CPUs without AVX-512 have no vector 64-bit multiply, so a 64-bit mixer
(splitmix64) runs ~3.7x slower in torch than this one. Keep probabilities are exact to 2^-32.

torch has no unsigned 32-bit arithmetic, so the mixer runs on int32 with wrapping multiplication
(two's complement: the low 32 bits are the same as unsigned) and logical right shifts done as an
arithmetic shift followed by a mask.
"""

from __future__ import annotations

import hashlib

import torch

MASK32 = 0xFFFFFFFF
M1 = 0x7FEB352D
M2 = 0x846CA68B
DRAW_BITS = 32


def _i32(x: int) -> int:
    x &= MASK32
    return x - (1 << 32) if x >= 1 << 31 else x


def derive_key(seed: int, tensor_name: str, digest: bytes) -> int:
    """A 64-bit key for one random op applied to one tensor."""
    h = hashlib.sha256()
    h.update(int(seed).to_bytes(16, "little", signed=True))
    h.update(tensor_name.encode())
    h.update(b"\0")
    h.update(digest)
    return int.from_bytes(h.digest()[:8], "little")


def _mix32(x: int) -> int:
    """lowbias32 on a Python integer."""
    x ^= x >> 16
    x = (x * M1) & MASK32
    x ^= x >> 15
    x = (x * M2) & MASK32
    return x ^ (x >> 16)


def _round_keys(key: int, high: int) -> tuple[int, int]:
    """Per-2^32-block key material: the 64-bit key and the index's high bits, mixed."""
    k0 = _mix32((key & MASK32) ^ _mix32(high ^ 0x9E3779B9))
    k1 = _mix32((key >> 32) ^ _mix32(k0 ^ 0x85EBCA6B))
    return k0, k1


def reference_draw(key: int, index: int) -> int:
    """The draw for one element, on Python integers: the definition that `draws` vectorizes."""
    k0, k1 = _round_keys(key, index >> 32)
    x = (index & MASK32) ^ k0
    x ^= x >> 16
    x = (x * M1) & MASK32
    x ^= (x >> 15) ^ k1
    x = (x * M2) & MASK32
    return x ^ (x >> 16)


def _srl(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int32 values."""
    return (x >> s) & ((1 << (32 - s)) - 1)


def _draws_block(key: int, start: int, count: int, device) -> torch.Tensor:
    """Draws (as int32 bit patterns) for a range that does not cross a multiple of 2^32."""
    k0, k1 = _round_keys(key, start >> 32)
    low = start & MASK32
    x = torch.arange(_i32(low), _i32(low) + count, dtype=torch.int64, device=device).to(torch.int32)
    x ^= _i32(k0)
    x ^= _srl(x, 16)
    x *= _i32(M1)
    x ^= _srl(x, 15) ^ _i32(k1)
    x *= _i32(M2)
    x ^= _srl(x, 16)
    return x


def draws(key: int, start: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Uniform 32-bit draws for elements start .. start+count-1, as int64 values in [0, 2^32)."""
    return _signed_draws(key, start, count, device).to(torch.int64) & MASK32


def _signed_draws(key: int, start: int, count: int, device) -> torch.Tensor:
    parts, pos, end = [], start, start + count
    while pos < end:
        stop = min(end, ((pos >> 32) + 1) << 32)
        parts.append(_draws_block(key, pos, stop - pos, device))
        pos = stop
    if not parts:
        return torch.empty(0, dtype=torch.int32, device=device)
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def threshold(keep_probability: float) -> int:
    """The integer a 32-bit draw must be below to keep an element with the given probability."""
    return min(1 << DRAW_BITS, round(keep_probability * (1 << DRAW_BITS)))


def keep_mask(key: int, start: int, count: int, keep_probability: float, device="cpu") -> torch.Tensor:
    """Bernoulli(keep_probability) booleans for elements start .. start+count-1."""
    limit = threshold(keep_probability)
    if limit >= 1 << DRAW_BITS:
        return torch.ones(count, dtype=torch.bool, device=device)
    # Unsigned comparison on int32: flipping the sign bit maps unsigned order onto signed order.
    return (_signed_draws(key, start, count, device) ^ _i32(1 << 31)) < _i32(limit ^ (1 << 31))
