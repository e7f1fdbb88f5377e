"""memory.py: malloc kept from returning freed memory, the heap touched ahead, aligned buffers."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mergelang import memory

glibc = pytest.mark.skipif(memory._MALLOPT is None, reason="glibc's malloc only")

# Faults taken while a block of 48 MB is allocated and written, after `tune_malloc` and optionally
# `warm_heap` of 64 MB; in a fresh interpreter, so that no earlier test shaped the heap.
FAULTS = """
import ctypes, resource, sys
from mergelang import memory
memory.tune_malloc()
if sys.argv[1] == "warm":
    assert memory.warm_heap(64 << 20)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
block = memory._MALLOC(48 << 20)
ctypes.memset(block, 1, 48 << 20)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str) -> int:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, env=env, check=True)
    return int(out.stdout)


@glibc
def test_a_warmed_heap_serves_the_next_blocks_without_faults():
    cold, warm = faults("cold"), faults("warm")
    # cold, each fresh page faults (12k here; a few dozen where the kernel maps huge pages); warm,
    # the pages were touched ahead and kept by malloc
    assert warm * 10 < cold
    assert warm < (48 << 20) // memory.PAGE // 20


@pytest.mark.parametrize("nbytes", [memory.PAGE, 4 << 20])
def test_aligned_buffers_start_on_a_page_and_are_zeroed_and_writable(nbytes):
    import ctypes

    buffers = [memory.aligned_buffer(nbytes) for _ in range(5)]
    for buffer in buffers:
        assert len(buffer) == nbytes and not buffer.readonly
        assert ctypes.addressof(ctypes.c_char.from_buffer(buffer)) % memory.PAGE == 0
        assert buffer.tobytes() == bytes(nbytes)
        buffer[-1:] = b"x"
    assert [b[-1] for b in buffers] == [ord("x")] * 5


def test_warm_heap_does_nothing_for_no_bytes():
    assert memory.warm_heap(0) is False


@pytest.mark.parametrize("free_mb,expected_mb", [(64 << 10, 160), (1024, 64), (100, 0)])
def test_the_heap_warmed_is_at_most_a_sixteenth_of_the_free_memory(monkeypatch, free_mb, expected_mb):
    sizes = {"SC_AVPHYS_PAGES": free_mb << 8, "SC_PAGE_SIZE": 4096}
    monkeypatch.setattr(os, "sysconf", sizes.__getitem__)
    assert memory.warm_bytes() == expected_mb << 20
