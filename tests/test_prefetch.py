"""The read-ahead of the files a merge loads after torch (prefetch.py, started by launch.py)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from mergelang import launch, memory, prefetch
from mergelang.prefetch import resident_pages


def test_the_files_are_the_compiled_modules_libraries_and_stored_loops(tmp_path, monkeypatch):
    loops = tmp_path / "loops"
    loops.mkdir(parents=True)
    (loops / ".x.tmp").write_text("being written: not read ahead\n")
    for k in range(4):  # 30 MB each, the newest last: the cap of 64 MB keeps the newest two
        path = loops / f"loop{k}.o"
        with open(path, "wb") as f:
            f.truncate(30 << 20)
        os.utime(path, (1000 + k, 1000 + k))
    monkeypatch.setenv("MERGELANG_CACHE_DIR", str(tmp_path))
    found = prefetch.files()
    tag = sys.implementation.cache_tag
    import lark
    import numba

    from mergelang.ops import machine_code

    numba_dir = Path(numba.__file__).parent
    assert numba_dir / "__pycache__" / f"__init__.{tag}.pyc" not in found  # numba is not imported
    assert {p for p in found if p.is_relative_to(numba_dir)} == {
        machine_code._extension(name, numba_dir / relative)[1] for name, relative, _ in machine_code.HELPERS}
    assert Path(lark.__file__).parent / "__pycache__" / f"__init__.{tag}.pyc" in found
    assert any(p.name.startswith("libllvmlite") for p in found)  # llvmlite's library
    assert not any(p.suffix == ".py" for p in found)
    assert {p.name for p in found if p.parent == loops} == {"loop3.o", "loop2.o"}


def evicted(path: Path) -> Path:
    """`path` written back and dropped from the page cache (skipping the test where the file
    system keeps it whatever is advised)."""
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    if resident_pages(path)[0]:
        pytest.skip("this file system keeps the file in memory whatever is advised")
    return path


def test_resident_pages_counts_the_pages_in_the_page_cache(tmp_path):
    real = tmp_path / "f.bin"
    real.write_bytes(os.urandom(5 * 4096 + 1))
    evicted(real)
    assert resident_pages(real) == (0, 6)
    with open(real, "rb") as f:
        f.seek(2 * 4096)
        f.read(4096)  # the third page (and whatever the kernel reads around it)
    assert 1 <= resident_pages(real)[0] <= 6
    real.read_bytes()
    assert resident_pages(real) == (6, 6)
    (tmp_path / "empty").write_bytes(b"")
    assert resident_pages(tmp_path / "empty") == (0, 0)
    assert resident_pages(tmp_path / "missing") == (0, 1)


def test_reading_ahead_brings_whole_files_into_the_page_cache_and_skips_the_rest(tmp_path):
    real = tmp_path / "f.bin"
    real.write_bytes(os.urandom(24 << 20))  # several requests' steps, more than a read-ahead window
    evicted(real)
    # The advice is a hint: under memory pressure the kernel drops some of its reads (5780 of 6144
    # pages arrived once, on a busy machine). Each page is asked for again, at most twice more; a
    # part of the file the calls never cover stays out however often they are made.
    for _ in range(3):
        prefetch.read_ahead([tmp_path / "missing", tmp_path, real])  # a folder opens but is not advised
        deadline = time.monotonic() + 5
        while resident_pages(real)[0] < resident_pages(real)[1] and time.monotonic() < deadline:
            time.sleep(0.02)
        if resident_pages(real)[0] == resident_pages(real)[1]:
            break
    assert resident_pages(real)[0] == resident_pages(real)[1]


@pytest.mark.parametrize("argv,started", [(["run", "x.ml"], True), (["demo", "d"], True),
                                          (["check", "x.ml"], False), ([], False)])
def test_only_the_merging_commands_read_ahead_and_warm_the_heap(monkeypatch, argv, started):
    calls = []
    monkeypatch.setattr(memory, "tune_malloc", lambda: calls.append("tune"))
    monkeypatch.setattr(memory, "warm_bytes", lambda: 3 << 20)
    monkeypatch.setattr(prefetch, "start", lambda warm_bytes: calls.append(("start", warm_bytes)))
    monkeypatch.setattr(launch, "_roomy", lambda command: None)  # the command itself is not run
    monkeypatch.setattr(sys, "argv", ["mergelang", *argv])
    launch.entry()
    # malloc is tuned before the thread starts: a thread allocating first would get its own arena
    assert calls == (["tune", ("start", 3 << 20)] if started else [])


@pytest.mark.parametrize("sentinel_pages,reads", [((3, 8), True), ((0, 1), True), ((8, 8), False)])
def test_the_thread_warms_the_heap_then_reads_ahead_unless_the_sentinel_is_cached(monkeypatch, sentinel_pages,
                                                                                  reads):
    calls = []
    monkeypatch.setattr(prefetch, "files", lambda: [Path("f")])
    monkeypatch.setattr(prefetch, "read_ahead", lambda paths: calls.append(("read", paths)))
    monkeypatch.setattr(prefetch, "warm_heap", lambda nbytes: calls.append(("warm", nbytes)))
    monkeypatch.setattr(prefetch, "resident_pages", lambda path: sentinel_pages)
    prefetch._run(5 << 20)
    assert calls == [("warm", 5 << 20)] + ([("read", [Path("f")])] if reads else [])


def test_the_sentinel_is_read_by_every_merge():
    """The compiled command line, which `run` and `demo` import (where bytecode is written)."""
    import mergelang.cli

    assert prefetch.sentinel().name.startswith("cli.") and prefetch.sentinel().parent.name == "__pycache__"
    assert Path(mergelang.cli.__cached__) == prefetch.sentinel()
