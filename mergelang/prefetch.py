"""On a thread, while the command's modules load: touch the heap a merge will use, then read ahead
the files it loads later (`launch.py` starts it for `run` and `demo`).

This was measured while every merge imported torch first (a second or more of one core; a merge
whose loops compute all of it no longer does: arrays.py). Meanwhile the disk is idle, though llvmlite (a
170 MB library), numba's two helper libraries, lark, mergelang's own modules and the
stored machine code of its loops are read later, one page fault at a time where the page cache no
longer holds them: a `dare_linear` run took 3.65 s with those files out of the cache against 3.15 s
with them in. The
thread asks the kernel to read them ahead (posix_fadvise WILLNEED, 4 MB at a time: one call reads
one read-ahead window at most; it returns once the reads are queued), so they arrive while torch
loads. Where they are cached already this costs a few
milliseconds of system calls.

Before that the thread touches the heap (memory.warm_heap), with the GIL released: the pages that
torch's import and then the merge allocate are faulted in on the core the import leaves idle. It
goes first because it needs the GIL for a few calls only, where finding the files to read ahead
takes 20 ms of Python, which the importing thread lets it run only in slices: started after that,
the heap was ready when torch was half loaded. Fresh pages in a `ties` run of the benchmark: 46k in
the threads that import and compute (and 41k in this one), against 96k without; its wall time fell
by 8% (median of 16 alternating runs, 14 of 16 pairs faster). In runs that never import torch it
still pays for `ties` (1.31 → 1.26 s, medians of 4 alternating runs) and changes `linear`'s time
nothing (0.72 s), for 80 MB more at the peak (190 → 270 MB).

Where mergelang ran within the kernel's eviction window, the files are cached and reading them
ahead only costs the importing thread the GIL: a `linear` run took 60 ms longer with the read-ahead
than without it (10 alternating runs each). So the thread reads ahead only where a sentinel file,
one every merge reads (`sentinel`), is not wholly in the page cache (mincore).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
import threading
from importlib.util import find_spec
from pathlib import Path

from .memory import libc_function, warm_heap
from .paths import cache_dir

PACKAGES = ("llvmlite", "lark")
# Of numba, a run that links stored loops loads only the helper libraries (machine_code.HELPERS).
NUMBA_LIBRARIES = ("_helperlib.", "_nrt_python.")
STEP = 4 << 20  # bytes per read-ahead request
CACHE_BYTES = 64 << 20  # of the loops' cache at most: an old cache may hold many regions no run needs


def files() -> list[Path]:
    """The compiled modules of this Python (`__pycache__/*.<tag>.pyc`) and the shared libraries of
    PACKAGES and mergelang, numba's helper libraries, then the stored loops (the newest first, up to
    CACHE_BYTES)."""
    tag = f".{sys.implementation.cache_tag}."
    found = []
    for folder in [Path(__file__).parent, *_package_folders(PACKAGES)]:
        for root, _, names in os.walk(folder):
            cached = os.path.basename(root) == "__pycache__"
            found += [Path(root, n) for n in names if (cached and tag in n) or n.endswith(".so")]
    for folder in _package_folders(("numba",)):
        for root, _, names in os.walk(folder):
            found += [Path(root, n) for n in names if n.startswith(NUMBA_LIBRARIES) and n.endswith(".so")]
    loops = cache_dir() / "loops"
    try:
        entries = sorted((e for e in os.scandir(loops) if e.name.endswith(".o")),
                         key=lambda e: e.stat().st_mtime, reverse=True)
    except OSError:
        entries = []
    total = 0
    for e in entries:
        total += e.stat().st_size
        if total > CACHE_BYTES:
            break
        found.append(Path(e.path))
    return found


def _package_folders(names) -> list[Path]:
    folders = []
    for name in names:
        try:
            spec = find_spec(name)  # a top-level name: nothing is imported
        except (ImportError, ValueError):
            continue
        if spec is not None and spec.submodule_search_locations:
            folders += [Path(p) for p in spec.submodule_search_locations]
    return folders


def read_ahead(paths: list[Path]) -> None:
    """Ask the kernel to read each file into the page cache (skipping those that cannot be opened)."""
    advise = getattr(os, "posix_fadvise", None)
    if advise is None:
        return
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            size = os.fstat(fd).st_size
            for offset in range(0, size, STEP):  # one call reads ahead one window (8 MB here) at most
                advise(fd, offset, min(STEP, size - offset), os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(fd)


def sentinel() -> Path:
    """A file every merge reads, as it reads the others: mergelang's compiled command line. Where
    it is wholly in the page cache, mergelang ran within the kernel's eviction window, and the
    files it reads ahead are cached too."""
    return Path(__file__).parent / "__pycache__" / f"cli.{sys.implementation.cache_tag}.pyc"


def resident_pages(path: Path) -> tuple[int, int]:
    """(pages of the file in the page cache, pages in all), by mincore(2) over a private mapping of
    it, which touches no page; (0, 1) where it cannot be asked."""
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                return 0, 0
            mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    except (OSError, ValueError):
        return 0, 1
    try:
        pages = -(-len(mapping) // mmap.PAGESIZE)
        vector = (ctypes.c_ubyte * pages)()
        anchor = ctypes.c_char.from_buffer(mapping)  # the mapping's address
        try:
            if _MINCORE is None or _MINCORE(ctypes.addressof(anchor), len(mapping), vector) != 0:
                return 0, pages
        finally:
            del anchor
        return sum(v & 1 for v in vector), pages
    finally:
        mapping.close()


_MINCORE = libc_function("mincore", ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)


def start(warm_bytes: int = 0) -> None:
    """Touch `warm_bytes` of the heap, then read ahead, on a daemon thread (the merge does not wait
    for it)."""
    threading.Thread(target=_run, args=(warm_bytes,), daemon=True, name="mergelang-prefetch").start()


def _run(warm_bytes: int) -> None:
    warm_heap(warm_bytes)
    try:
        cached, pages = resident_pages(sentinel())
        if cached < pages:
            read_ahead(files())
    except Exception:  # noqa: BLE001 - a hint to the kernel: nothing to report when it cannot be given
        pass
