"""Output files written at any offset, in any order, with direct I/O or through the page cache:
the file's bytes are compared with the bytes given."""

from __future__ import annotations

import errno
import os
import random
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mergelang.io import output_file
from mergelang.io.output_file import PAGE, OutputFile, Staging, direct_io_default

needs_o_direct = pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT on this system")


def direct_file(path: Path, size: int, stage_bytes: int = 2 * PAGE, runs: int = 2) -> OutputFile:
    file = OutputFile(path, size, Staging(stage_bytes, runs))
    if not file.direct:
        file.abort()
        pytest.skip(f"the file system of {path.parent} refuses O_DIRECT")
    return file


def pieces(data: bytes, cuts: list[int], seed: int) -> list[tuple[int, bytes]]:
    """`data` cut at `cuts`, the pieces shuffled."""
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    parts = [(a, data[a:b]) for a, b in zip(points[:-1], points[1:], strict=True)]
    random.Random(seed).shuffle(parts)
    return parts


def write_pieces(file: OutputFile, parts: list[tuple[int, bytes]]) -> None:
    for offset, part in parts:
        file.write(memoryview(part), offset)
    file.close()


@needs_o_direct
@settings(max_examples=60, deadline=None)
@given(
    size=st.integers(1, 5 * PAGE + 100) | st.sampled_from([PAGE, 2 * PAGE, 3 * PAGE - 1, 3 * PAGE + 1]),
    cuts=st.lists(st.integers(0, 10 * PAGE), max_size=12),
    seed=st.integers(0, 2**16),
    stage_pages=st.integers(1, 3),
    runs=st.integers(1, 3),
)
def test_direct_writes_in_any_order_give_the_bytes_written(tmp_path_factory, size, cuts, seed, stage_pages, runs):
    data = random.Random(seed).randbytes(size)
    path = tmp_path_factory.mktemp("direct") / "out.bin"
    file = direct_file(path, size, stage_pages * PAGE, runs)
    write_pieces(file, pieces(data, cuts, seed))
    assert path.read_bytes() == data


@needs_o_direct
def test_in_order_writes_keep_at_most_one_page_waiting(tmp_path: Path):
    """A file written front to back holds back only the page shared with the next write."""
    data = random.Random(3).randbytes(40 * PAGE + 123)
    file = direct_file(tmp_path / "out.bin", len(data))
    offset, rng, most = 0, random.Random(4), 0
    while offset < len(data):
        n = rng.randrange(1, 3 * PAGE)
        file.write(memoryview(data[offset : offset + n]), offset)
        most = max(most, len(file._pages))
        offset += n
    file.close()
    assert most == 1
    assert (tmp_path / "out.bin").read_bytes() == data


@needs_o_direct
def test_unwritten_bytes_are_zeros_and_the_size_is_exact(tmp_path: Path):
    size = 3 * PAGE + 17
    file = direct_file(tmp_path / "out.bin", size)
    file.write(memoryview(b"\x01" * 10), PAGE - 5)  # a page never filled on either side
    file.write(memoryview(b"\x02" * 7), size - 7)
    file.close()
    expected = bytearray(size)
    expected[PAGE - 5 : PAGE + 5] = b"\x01" * 10
    expected[size - 7 :] = b"\x02" * 7
    assert (tmp_path / "out.bin").read_bytes() == bytes(expected)


@needs_o_direct
def test_a_write_refused_with_einval_goes_on_through_the_page_cache(tmp_path: Path, monkeypatch):
    """A file system that opens with O_DIRECT but refuses the writes: the file leaves direct I/O,
    writes the pages that wait and then everything else as usual; the bytes are the same."""
    import fcntl

    real = os.pwrite

    def refuse_direct(fd, data, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)

    data = random.Random(5).randbytes(6 * PAGE + 77)
    file = direct_file(tmp_path / "out.bin", len(data))
    parts = pieces(data, [100, 2 * PAGE + 3, 2 * PAGE + 9, 5 * PAGE], 6)
    file.write(memoryview(parts[0][1]), parts[0][0])  # some of it direct, some waiting in pages
    monkeypatch.setattr(os, "pwrite", refuse_direct)
    write_pieces(file, parts[1:])
    assert not file.direct
    assert (tmp_path / "out.bin").read_bytes() == data


def test_open_refused_with_einval_writes_through_the_page_cache(tmp_path: Path, monkeypatch):
    real = os.open
    direct = getattr(os, "O_DIRECT", 0)

    def refuse_direct(path, flags, mode=0o777):
        if direct and flags & direct:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(path, flags, mode)

    monkeypatch.setattr(os, "open", refuse_direct)
    data = random.Random(7).randbytes(2 * PAGE + 5)
    file = OutputFile(tmp_path / "out.bin", len(data), Staging())
    assert not file.direct
    write_pieces(file, pieces(data, [1, PAGE + 1], 8))
    assert (tmp_path / "out.bin").read_bytes() == data


def test_other_open_errors_are_raised(tmp_path: Path):
    with pytest.raises(FileNotFoundError):
        OutputFile(tmp_path / "missing" / "out.bin", 10, Staging())


def test_environment_turns_direct_io_off(monkeypatch):
    monkeypatch.setenv(output_file.ENV, "0")
    assert not direct_io_default()
    monkeypatch.setenv(output_file.ENV, "1")
    assert direct_io_default() == hasattr(os, "O_DIRECT")


def test_buffered_files_give_the_bytes_written(tmp_path: Path):
    data = random.Random(9).randbytes(3 * PAGE + 1)
    file = OutputFile(tmp_path / "out.bin", len(data))
    assert not file.direct
    write_pieces(file, pieces(data, [5, PAGE, 2 * PAGE + 7], 10))
    assert (tmp_path / "out.bin").read_bytes() == data


@needs_o_direct
def test_writes_that_follow_one_another_go_to_disk_a_full_run_at_a_time(tmp_path: Path, monkeypatch):
    """Two streams written alternately (tensors side by side): each gathers its own run, and the
    disk sees runs of the staging size, not one write per chunk."""
    sizes: list[int] = []
    real = os.pwrite

    def counting(fd, data, offset):
        sizes.append(len(data))
        return real(fd, data, offset)

    data = random.Random(11).randbytes(64 * PAGE)
    file = direct_file(tmp_path / "out.bin", len(data), stage_bytes=8 * PAGE, runs=2)
    monkeypatch.setattr(os, "pwrite", counting)
    half = len(data) // 2
    for k in range(0, half, 2 * PAGE):  # chunks of two pages, the two halves in turn
        file.write(memoryview(data[k : k + 2 * PAGE]), k)
        file.write(memoryview(data[half + k : half + k + 2 * PAGE]), half + k)
    file.close()
    assert sizes == [8 * PAGE] * 8
    assert (tmp_path / "out.bin").read_bytes() == data


@needs_o_direct
def test_a_run_beyond_the_limit_is_written_early_and_nothing_is_lost(tmp_path: Path):
    data = random.Random(12).randbytes(12 * PAGE)
    file = direct_file(tmp_path / "out.bin", len(data), stage_bytes=8 * PAGE, runs=1)
    for k in (0, 6, 3, 9):  # four streams of one or more pages, one run allowed at a time
        file.write(memoryview(data[k * PAGE : (k + 3) * PAGE]), k * PAGE)
        assert len(file._staging.runs) <= 1
    file.close()
    assert (tmp_path / "out.bin").read_bytes() == data


@needs_o_direct
def test_chunks_that_do_not_end_on_a_page_still_make_full_runs(tmp_path: Path, monkeypatch):
    """The page two chunks share joins the run when it fills, so the next chunk's pages go on it."""
    sizes: list[int] = []
    real = os.pwrite

    def counting(fd, data, offset):
        sizes.append(len(data))
        return real(fd, data, offset)

    data = random.Random(13).randbytes(40 * PAGE + 100)
    file = direct_file(tmp_path / "out.bin", len(data), stage_bytes=8 * PAGE, runs=2)
    monkeypatch.setattr(os, "pwrite", counting)
    for k in range(0, len(data), 3 * PAGE + 7):
        file.write(memoryview(data[k : k + 3 * PAGE + 7]), k)
    file.close()
    assert sizes == [8 * PAGE] * 5 + [PAGE]  # the last page, written whole and cut at close
    assert (tmp_path / "out.bin").read_bytes() == data


@needs_o_direct
def test_the_next_run_fills_while_the_disk_writes_the_last(tmp_path: Path, monkeypatch):
    """A full run goes to the disk thread: the writes after it return while that write still waits."""
    real = os.pwrite
    gate = threading.Event()

    def waiting(fd, data, offset):
        assert gate.wait(10), "the write was not let through"
        return real(fd, data, offset)

    data = random.Random(14).randbytes(4 * PAGE)
    file = direct_file(tmp_path / "out.bin", len(data), stage_bytes=2 * PAGE, runs=1)
    monkeypatch.setattr(os, "pwrite", waiting)
    file.write(memoryview(data[: 2 * PAGE]), 0)  # a full run: handed over, its write blocked
    file.write(memoryview(data[2 * PAGE :]), 2 * PAGE)  # the second run, also handed over
    gate.set()
    file.close()
    assert (tmp_path / "out.bin").read_bytes() == data


@needs_o_direct
def test_an_error_writing_a_run_reaches_the_writer_and_stops_the_writes(tmp_path: Path, monkeypatch):
    """A disk that fills up under a run's write: the error is raised by a later write or close, the
    runs handed over after it are dropped, and abort leaves nothing writing to the file."""
    real = os.pwrite
    offsets: list[int] = []

    def filling(fd, data, offset):
        offsets.append(offset)
        if len(offsets) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    data = random.Random(15).randbytes(40 * PAGE)
    file = direct_file(tmp_path / "out.bin", len(data), stage_bytes=PAGE, runs=1)
    monkeypatch.setattr(os, "pwrite", filling)
    with pytest.raises(OSError) as caught:
        for k in range(0, len(data), PAGE):
            file.write(memoryview(data[k : k + PAGE]), k)
        file.close()
    assert caught.value.errno == errno.ENOSPC
    file.abort()
    assert offsets == [0, PAGE]


@needs_o_direct
@pytest.mark.parametrize("big_copy", [1, output_file.BIG_COPY])
def test_large_copies_into_staging_leave_the_gil_and_give_the_bytes_written(tmp_path: Path, monkeypatch, big_copy):
    """Writable pieces from BIG_COPY bytes on are copied into staging memory by ctypes.memmove (which
    releases the GIL); the file holds the bytes written, pieces shuffled and straddling pages, with
    every copy through memmove (big_copy=1) and with only the large ones (the default)."""
    import ctypes

    moved: list[int] = []
    real = ctypes.memmove
    monkeypatch.setattr(ctypes, "memmove", lambda dst, src, n: moved.append(n) or real(dst, src, n))
    large = output_file.BIG_COPY
    monkeypatch.setattr(output_file, "BIG_COPY", big_copy)
    size = 3 * large + 5 * PAGE + 123
    data = random.Random(7).randbytes(size)
    path = tmp_path / "out.bin"
    file = direct_file(path, size, 2 * large, 3)  # room for a large copy into a run
    cuts = [1, PAGE - 1, PAGE + 5, large + 17, 2 * large + PAGE, size - 9]
    for offset, part in pieces(data, cuts, seed=3):
        file.write(memoryview(bytearray(part)), offset)
    file.close()
    assert path.read_bytes() == data
    assert moved and min(moved) >= big_copy and max(moved) >= large


def test_the_disk_thread_lingers_between_runs_and_ends_when_idle(monkeypatch):
    """Jobs that come while the disk thread waits for more run on that one thread, in order; once
    nothing has come for LINGER_S it ends, and the next job starts another."""
    import time

    monkeypatch.setattr(output_file, "LINGER_S", 0.3)
    flusher = output_file.Flusher(2)
    ran: list[tuple[int, threading.Thread]] = []  # the thread objects themselves: idents are reused

    def disk_threads() -> int:
        return sum(t.name == "mergelang-disk" for t in threading.enumerate())

    for i in range(5):
        flusher.submit(lambda i=i: ran.append((i, threading.current_thread())))
        flusher.wait()
        time.sleep(0.02)  # the thread is idle here, waiting for the next job
    assert [i for i, _ in ran] == list(range(5)) and all(t is ran[0][1] for _, t in ran)
    deadline = time.monotonic() + 5
    while disk_threads() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert disk_threads() == 0
    flusher.submit(lambda: ran.append((5, threading.current_thread())))
    flusher.wait()
    assert ran[-1][0] == 5 and ran[-1][1] is not ran[0][1]
