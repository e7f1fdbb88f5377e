"""One output file: sized and preallocated up front, written in place at any offset, with direct I/O
where the file system allows it.

A buffered write copies every byte into a newly allocated page-cache page, which the kernel writes
back later; for an output the size of a model that copy is a large share of a merge's CPU time, and
the dirty pages crowd out the inputs' cached pages. With O_DIRECT the disk reads the bytes from our
memory instead. O_DIRECT wants page-aligned memory, offsets and lengths, while tensors start at any
byte: so the whole pages inside a write are copied into aligned staging memory, gathered into runs
of up to 4 MB while writes follow one another (Staging), and written a run at a time, on a thread
of their own so that the disk works while the next run fills; the bytes at either end, which share
a page with data not yet written, wait in a page buffer until that page is full. The file's last
page is written whole and the file cut back to its size when it is closed. Each byte must be
written once (the writer writes each element once).

Where the file system refuses O_DIRECT, at open or at a write, the file goes through the page cache,
handed to the disk in steps while the merge runs. MERGELANG_DIRECT_IO=0 asks for that too.
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading
from collections import deque
from pathlib import Path
from typing import Callable

from ..memory import PAGE, aligned_buffer, libc_function

ENV = "MERGELANG_DIRECT_IO"
STAGE_BYTES = 4 << 20
MAX_RUNS = 8
IN_FLIGHT = 2  # full runs handed to the disk thread and not yet written
LINGER_S = 0.5  # seconds the disk thread waits for another run before it ends
_O_DIRECT = getattr(os, "O_DIRECT", 0)
_FALLOCATE_UNSUPPORTED = {errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL}
# Buffered data is handed to the disk in steps of this size while the merge runs, so that the fsync
# at the end waits for the last step only, not for the whole output.
WRITEBACK_BYTES = 64 << 20


def direct_io_default() -> bool:
    return _O_DIRECT != 0 and os.environ.get(ENV, "1").strip() != "0"


def _writeback_starter():
    """Linux's sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE): start writing a file's dirty pages
    to disk without waiting for them. None where it is unavailable (the final fsync does it all)."""
    sync_file_range = libc_function("sync_file_range", ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    if sync_file_range is None:
        return None
    write = 2  # SYNC_FILE_RANGE_WRITE

    def start(fd: int) -> None:
        sync_file_range(fd, 0, 0, write)  # a failure only means the final fsync has more to do

    return start


_start_writeback = _writeback_starter()


def _clear_direct(fd: int) -> None:
    import fcntl

    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~_O_DIRECT)


BIG_COPY = 64 << 10  # bytes from which a copy into staging memory leaves the GIL to other threads


def copy_into(target: memoryview, source: memoryview) -> None:
    """target[:len(source)] = source. A large copy goes through ctypes.memmove, which releases the
    GIL: a slice assignment holds it, and the output's copies held it for 0.19 s of a dare_linear
    run (1 GB), while the workers' Python waited. A read-only source is copied by slicing."""
    n = len(source)
    if n >= BIG_COPY and not source.readonly:  # the buffers' addresses, without a ctypes type per length
        ctypes.memmove(_address(target), _address(source), n)
    else:
        target[:n] = source


def _address(buffer: memoryview) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buffer))


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


class Staging:
    """Page-aligned memory for the direct writes of one output's files, one write at a time: runs of
    whole pages gathered until a run fills its buffer (a chunk is 1-2 MB; a direct write waits for
    the disk, and larger ones keep it busier). A run goes on while the next write starts where it
    ends: tensors written side by side each make their own. At most `runs` wait at once; beyond
    that the oldest is written as it is. Full runs go to the disk on a thread (Flusher)."""

    def __init__(self, nbytes: int = STAGE_BYTES, runs: int = MAX_RUNS, in_flight: int = IN_FLIGHT):
        self.lock = threading.Lock()
        self.nbytes, self.max_runs = nbytes, runs
        self.runs: dict[tuple[int, int], list] = {}  # (file id, end offset) → [file, start, buffer], oldest first
        self.flusher = Flusher(in_flight)
        self._free: list[memoryview] = []
        self._free_lock = threading.Lock()  # buffers come back from the flusher's thread

    def take(self) -> memoryview:
        with self._free_lock:
            if self._free:
                return self._free.pop()
        return aligned_buffer(self.nbytes)

    def give(self, buffer: memoryview) -> None:
        with self._free_lock:
            self._free.append(buffer)


class Flusher:
    """Runs write jobs in order on a thread of its own, at most `limit` queued or running: a direct
    write waits for the disk, and the run after it is gathered meanwhile (a copy into it and a
    write of it one after the other left the disk idle during every copy). The thread ends when
    nothing has been left to do for LINGER_S and starts again with the next job (ending at once, it
    was started anew for every second run of a merge: 107 times in a dare_linear run, each start
    holding the GIL). A job's error is raised by the next `submit` or `wait`, and the jobs queued
    after it are dropped."""

    def __init__(self, limit: int):
        self._limit = max(1, limit)
        self._cond = threading.Condition()
        self._jobs: deque[Callable[[], None]] = deque()
        self._busy = False
        self._error: BaseException | None = None
        self._running = False

    def submit(self, job: Callable[[], None]) -> None:
        with self._cond:
            while len(self._jobs) + self._busy >= self._limit and self._error is None:
                self._cond.wait()
            self._raise()
            self._jobs.append(job)
            if not self._running:
                self._running = True
                threading.Thread(target=self._run, daemon=True, name="mergelang-disk").start()
            self._cond.notify_all()

    def wait(self) -> None:
        """Until every job submitted is done; raise the error of one that failed."""
        with self._cond:
            while (self._jobs or self._busy) and self._error is None:
                self._cond.wait()
            self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._jobs:
                    self._cond.wait(LINGER_S)
                if not self._jobs:
                    self._running = False
                    return
                job = self._jobs.popleft()
                self._busy = True
            try:
                job()
            except BaseException as error:  # the writer is aborted: what waits is not written
                with self._cond:
                    self._error = error
                    self._jobs.clear()
            with self._cond:
                self._busy = False
                self._cond.notify_all()


class OutputFile:
    """A file of `size` bytes at `path`, created (or truncated), preallocated and written with `write`.

    Direct I/O is used when `staging` is given and the file system takes it."""

    def __init__(self, path: Path, size: int, staging: Staging | None = None):
        self.path, self.size = Path(path), size
        self._staging = staging
        self._lock = staging.lock if staging is not None else threading.Lock()
        self._pages: dict[int, list] = {}  # page index -> [page buffer, bytes filled]
        self._unflushed = 0
        self._refused = False  # a run's direct write was refused (EINVAL): it went through the page cache
        flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC
        self.direct = staging is not None and _O_DIRECT != 0
        fd = None
        if self.direct:
            try:
                fd = os.open(self.path, flags | _O_DIRECT, 0o644)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self.direct = False
        if fd is None:
            fd = os.open(self.path, flags, 0o644)
        self.fd: int | None = fd
        try:
            os.ftruncate(fd, size)
            if hasattr(os, "posix_fallocate") and size > 0:
                try:
                    os.posix_fallocate(fd, 0, size)
                except OSError as exc:
                    if exc.errno not in _FALLOCATE_UNSUPPORTED:
                        raise
        except BaseException:
            self.abort()
            raise

    def write(self, data: memoryview, offset: int) -> None:
        """Write `data` (bytes) at `offset`."""
        if not self.direct:
            self._write_buffered(data, offset)
            return
        with self._lock:
            if self.direct and self._refused:
                self._leave_direct_io()
            if self.direct:
                self._write_direct(data, offset)
                return
        self._write_buffered(data, offset)

    def _write_buffered(self, data: memoryview, offset: int) -> None:
        pwrite_all(self.fd, data, offset)
        with self._lock:
            self._unflushed += len(data)
            flush = self._unflushed >= WRITEBACK_BYTES and _start_writeback is not None
            if flush:
                self._unflushed = 0
        if flush:
            _start_writeback(self.fd)

    def _write_direct(self, data: memoryview, offset: int) -> None:
        end = offset + len(data)
        first = -(-offset // PAGE) * PAGE  # the whole pages inside [offset, end) are [first, last)
        last = end // PAGE * PAGE
        if first >= last:
            self._into_pages(data, offset)
            return
        self._into_pages(data[: first - offset], offset)
        self._into_runs(data[first - offset : last - offset], first)
        self._into_pages(data[last - offset :], last)

    def _into_runs(self, data: memoryview, position: int) -> None:
        """Whole pages: appended to the run that ends at `position`, or the start of a new one."""
        staging = self._staging
        while len(data):
            run = staging.runs.pop((id(self), position), None)
            if run is None:
                while len(staging.runs) >= staging.max_runs:
                    oldest = next(iter(staging.runs))
                    staging.runs[oldest][0]._write_run(oldest)
                run = [self, position, staging.take()]
            _, start, buffer = run
            used = position - start
            n = min(len(buffer) - used, len(data))
            copy_into(buffer[used : used + n], data[:n])
            position, data = position + n, data[n:]
            staging.runs[(id(self), position)] = run
            if position - start == len(buffer):
                self._write_run((id(self), position))

    def _write_run(self, key: tuple[int, int]) -> None:
        """Hand a run to the disk thread; its buffer comes back once written."""
        staging = self._staging
        _, start, buffer = staging.runs.pop(key)
        data = buffer[: key[1] - start]

        def job() -> None:
            try:
                self._pwrite_run(data, start)
            finally:
                staging.give(buffer)

        staging.flusher.submit(job)

    def _pwrite_run(self, data: memoryview, offset: int) -> None:
        """A direct write; refused (EINVAL), the file leaves direct I/O and writes it through the page
        cache (the writing thread then writes the pages that wait: _leave_direct_io)."""
        try:
            pwrite_all(self.fd, data, offset)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self._refused = True
            _clear_direct(self.fd)
            pwrite_all(self.fd, data, offset)

    def _write_runs(self) -> None:
        for key in [k for k in self._staging.runs if k[0] == id(self)]:
            self._write_run(key)

    def _into_pages(self, data: memoryview, offset: int) -> None:
        position, end = offset, offset + len(data)
        while position < end:
            index = position // PAGE
            base = index * PAGE
            stop = min(end, base + PAGE)
            page = self._pages.get(index)
            if page is None:
                page = self._pages[index] = [aligned_buffer(PAGE), 0]
            page[0][position - base : stop - base] = data[position - offset : stop - offset]
            page[1] += stop - position
            if page[1] >= min(PAGE, self.size - base):
                self._into_runs(memoryview(page[0]), base)  # the last page whole; cut at close
                del self._pages[index]
            position = stop

    def _flush_pages(self) -> None:
        """Write every waiting run, and every waiting page whole (bytes not yet given are zeros, as
        in the file), and wait until the runs are written."""
        if self._staging is not None:
            self._write_runs()
        for index, (page, _) in sorted(self._pages.items()):
            pwrite_all(self.fd, memoryview(page), index * PAGE)
        self._pages.clear()
        if self._staging is not None:
            self._staging.flusher.wait()

    def _leave_direct_io(self) -> None:
        self._staging.flusher.wait()  # runs already handed over go first (through the page cache if refused)
        _clear_direct(self.fd)
        self.direct = False
        self._flush_pages()

    def close(self) -> None:
        """Write what waits, cut the file to its size, fsync and close it."""
        try:
            with self._lock:
                try:
                    self._flush_pages()
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise
                    self._leave_direct_io()
                if self.direct and self._refused:
                    self._leave_direct_io()
            os.ftruncate(self.fd, self.size)
            os.fsync(self.fd)
        except BaseException:
            self.abort()
            raise
        os.close(self.fd)
        self.fd = None

    def abort(self) -> None:
        """Close without writing what waits (the file is left incomplete)."""
        if self._staging is not None:
            with self._lock:
                for key in [k for k in self._staging.runs if k[0] == id(self)]:
                    self._staging.give(self._staging.runs.pop(key)[2])
            try:
                self._staging.flusher.wait()  # no write may reach the descriptor after it is closed
            except Exception:  # noqa: BLE001 - the error being handled is the one that matters
                pass
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = None
        self._pages.clear()
