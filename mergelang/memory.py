"""The process's memory: how glibc's malloc keeps freed blocks, fresh pages touched ahead of use,
and page-aligned buffers taken from malloc's heap.

The first touch of a fresh page costs a fault and the zeroing of 4 KB, and on the virtual machines
this was measured on often much more: 2.4-13 µs per page (0.6-3.3 s per GB; the host backs anew
the memory the guest freed a while ago), where a touch of memory the process already holds costs
nothing. A `ties` merge of 0.95 GB models takes about 380 MB of fresh memory, half while torch
loads and half while it computes: 15% of its CPU samples were the kernel zeroing pages in one
profile. Memory that malloc keeps for reuse (`tune_malloc`) is touched once, so `warm_heap`
touches the heap a merge will use ahead of time, on a thread, while the main thread imports torch
on the other core.
"""

from __future__ import annotations

import ctypes
import os
import sys

PAGE = 4096
# Heap touched ahead by `warm_heap` for a merge: below what the benchmark merges keep in malloc's
# heap at their peak (150-220 MB), so their peak memory does not grow; at most a sixteenth of the
# memory free when the merge starts (`warm_bytes`).
WARM_BYTES = 160 << 20
WARM_PIECE = 8 << 20


def libc_function(name: str, *argtypes, restype=ctypes.c_int):
    """A function of the process's C library through ctypes (which releases the GIL for each call,
    errno kept for ctypes.get_errno), or None where it has none by that name."""
    try:
        function = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    function.argtypes, function.restype = argtypes, restype
    return function


# glibc's malloc tuning; None elsewhere (musl and others have no mallopt), and then nothing here
# touches the heap: without the tuning, freed blocks would go back to the system.
_MALLOPT = libc_function("mallopt", ctypes.c_int, ctypes.c_int) if sys.platform.startswith("linux") else None
_MALLOC = libc_function("malloc", ctypes.c_size_t, restype=ctypes.c_void_p)
_FREE = libc_function("free", ctypes.c_void_p, restype=None)


def tune_malloc() -> None:
    """Ask glibc to keep freed memory for reuse, in one arena, instead of returning it to the OS.

    Each chunk allocates a few fresh buffers of a few MB, and each tensor a few whole values of tens
    of MB. By default glibc maps and unmaps each large block, and every first touch of a new page
    faults and zeroes it: that cost more time than the arithmetic. With a high mmap and trim
    threshold freed blocks are reused, and the peak stays what is live. One arena: a thread's own
    arena grows in heaps of at most 64 MB, handing larger blocks back to mmap, and gives memory back
    as it shrinks (two workers' arenas faulted in 1.3 GB on a `dare_linear` of 0.95 GB models;
    one, 0.7 GB, the size of the peak). Call it before other threads start (launch.py does, before
    torch loads; cli again on import).
    """
    if _MALLOPT is None:
        return
    m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8
    _MALLOPT(m_mmap_threshold, 1 << 30)
    _MALLOPT(m_trim_threshold, 1 << 30)
    _MALLOPT(m_arena_max, 1)


def warm_bytes() -> int:
    """How much of the heap a merge touches ahead: WARM_BYTES, or a sixteenth of the memory free
    now where that is less (a small machine keeps its memory for the merge itself)."""
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # no such query here: the default stands
        return WARM_BYTES
    return max(0, min(WARM_BYTES, free // 16 // WARM_PIECE * WARM_PIECE))


def warm_heap(nbytes: int = WARM_BYTES, piece: int = WARM_PIECE) -> bool:
    """Touch `nbytes` of malloc's heap and give them back to malloc, which keeps them (after
    `tune_malloc`): the buffers allocated next reuse pages already faulted in. The heap is taken in
    pieces, all at once, then each piece is touched (with the GIL released) and freed in turn, so
    that other threads allocating meanwhile get touched pages before the end. False where there is
    no glibc or malloc refuses a piece."""
    if _MALLOPT is None or _MALLOC is None or _FREE is None or nbytes <= 0:
        return False
    sizes = [min(piece, nbytes - start) for start in range(0, nbytes, piece)]
    taken = []
    for size in sizes:
        address = _MALLOC(size)
        if not address:
            break
        taken.append((address, size))
    for address, size in taken:
        ctypes.memset(address, 0, size)
        _FREE(address)
    return len(taken) == len(sizes)


def aligned_buffer(nbytes: int) -> memoryview:
    """A writable, zeroed buffer of `nbytes` starting on a page boundary, for direct I/O. It comes
    from malloc (reusing memory already touched, where an anonymous mapping is always fresh) and is
    freed when the last view of it goes."""
    block = bytearray(nbytes + PAGE - 1)
    start = -ctypes.addressof(ctypes.c_char.from_buffer(block)) % PAGE
    return memoryview(block)[start:start + nbytes]
