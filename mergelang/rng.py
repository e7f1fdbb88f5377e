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

from .lazy import torch

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
    return keyed_draw(index, *_round_keys(key, index >> 32))


def keyed_draw(index: int, k0: int, k1: int) -> int:
    """The draw for the low 32 bits of an index under the round keys of its high bits."""
    x = (index & MASK32) ^ k0
    x ^= x >> 16
    x = (x * M1) & MASK32
    x ^= (x >> 15) ^ k1
    x = (x * M2) & MASK32
    return x ^ (x >> 16)


# Draws are computed in blocks that fit a core's L2 cache, with in-place integer ops: the mixer is
# a dozen passes over its block, so keeping the block in cache makes it ~2x faster than whole chunks.
BLOCK = 1 << 18


def _mix_block(x: torch.Tensor, k0: int, k1: int) -> torch.Tensor:
    """In place: the keyed mixer on int32 lanes holding the low 32 bits of element indices."""
    x ^= _i32(k0)
    t = x >> 16
    t &= 0xFFFF  # logical shift: clear the copies of the sign bit
    x ^= t
    x *= _i32(M1)
    torch.bitwise_right_shift(x, 15, out=t)
    t &= 0x1FFFF
    t ^= _i32(k1)
    x ^= t
    x *= _i32(M2)
    torch.bitwise_right_shift(x, 16, out=t)
    t &= 0xFFFF
    x ^= t
    return x


def _blocks(start: int, count: int):
    """(offset in the output, first index, length): blocks of at most BLOCK that never cross a
    multiple of 2^31 (so the int32 lanes of a block are one arange) nor of 2^32 (one key)."""
    pos, end = start, start + count
    while pos < end:
        stop = min(end, pos + BLOCK, ((pos >> 31) + 1) << 31)
        yield pos - start, pos, stop - pos
        pos = stop


def _signed_draws(key: int, start: int, count: int, device, out: torch.Tensor | None = None) -> torch.Tensor:
    """The draws' 32-bit patterns as int32, for elements start .. start+count-1."""
    out = torch.empty(count, dtype=torch.int32, device=device) if out is None else out
    for offset, first, n in _blocks(start, count):
        k0, k1 = _round_keys(key, first >> 32)
        low = _i32(first & MASK32)
        block = out[offset:offset + n]
        torch.arange(low, low + n, dtype=torch.int32, device=device, out=block)
        _mix_block(block, k0, k1)
    return out


def draws(key: int, start: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Uniform 32-bit draws for elements start .. start+count-1, as int64 values in [0, 2^32)."""
    return _signed_draws(key, start, count, device).to(torch.int64) & MASK32


def threshold(keep_probability: float) -> int:
    """The integer a 32-bit draw must be below to keep an element with the given probability."""
    return min(1 << DRAW_BITS, round(keep_probability * (1 << DRAW_BITS)))


def keep_mask(key: int, start: int, count: int, keep_probability: float, device="cpu") -> torch.Tensor:
    """Bernoulli(keep_probability) booleans for elements start .. start+count-1."""
    limit = threshold(keep_probability)
    if limit >= 1 << DRAW_BITS:
        return torch.ones(count, dtype=torch.bool, device=device)
    out = torch.empty(count, dtype=torch.bool, device=device)
    scratch = torch.empty(min(count, BLOCK), dtype=torch.int32, device=device)
    for offset, first, n in _blocks(start, count):
        block = _signed_draws(key, first, n, device, out=scratch[:n])
        # Unsigned comparison on int32: flipping the sign bit maps unsigned order onto signed order.
        block ^= _i32(1 << 31)
        torch.lt(block, _i32(limit ^ (1 << 31)), out=out[offset:offset + n])
    return out
