"""Overlap reads, compute and writes: a read-ahead thread, a write-behind thread, and a pool of
workers that evaluate whole tensors side by side.

The executor's reads are mostly predictable: for every tensor, for every chunk, each load of
the tensor's region in schedule order. The read-ahead thread issues them in that order into a
queue bounded in bytes. A request found in the queue drops the predictions before it (reads the
executor did not need after all); one not in the queue (a reduction's extra passes) is read
directly. Writes go through a bounded queue to a
thread that pwrites them, so conversion and computation of the next chunk overlap the copy.
pread/pwrite, the loops and torch's ops release the GIL, so two threads do run at once. The data are
numpy arrays or torch tensors (arrays.py): only their `nbytes` is read here.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
Request = tuple[str, str, int, int]  # (model, tensor, first element, end element)


class ReadAhead:
    def __init__(self, requests: Iterable[Request], read: Callable[[str, str, int, int], object],
                 limit_bytes: int = 16 << 20):
        self._read = read
        self._limit = limit_bytes
        self._queue: deque[tuple[Request, object]] = deque()
        self._bytes = 0
        self._done = False
        self._stop = False
        self._error: BaseException | None = None
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, args=(iter(requests),), daemon=True,
                                        name="mergelang-read-ahead")
        self._thread.start()

    def _run(self, requests: Iterator[Request]) -> None:
        try:
            for req in requests:
                with self._cond:
                    while self._bytes >= self._limit and not self._stop:
                        self._cond.wait()
                    if self._stop:
                        return
                data = self._read(*req)
                with self._cond:
                    self._queue.append((req, data))
                    self._bytes += data.nbytes
                    self._cond.notify_all()
        except BaseException as e:  # re-raised in the reading thread by read()
            with self._cond:
                self._error = e
        finally:
            with self._cond:
                self._done = True
                self._cond.notify_all()

    def read(self, model: str, tensor: str, start: int, stop: int):
        req = (model, tensor, start, stop)
        with self._cond:
            while not self._queue and not self._done:
                self._cond.wait()
            if any(r == req for r, _ in self._queue):
                while True:
                    r, data = self._queue.popleft()
                    self._bytes -= data.nbytes
                    if r == req:
                        self._cond.notify_all()
                        return data
            if self._error is not None and not self._queue:
                raise self._error
        return self._read(*req)

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._queue.clear()
            self._cond.notify_all()
        self._thread.join()


class WriteBehind:
    """Calls `write(*item)` on a thread, in order; `put` blocks while `limit_bytes` are pending."""

    def __init__(self, write: Callable[[str, int, object], None], limit_bytes: int = 16 << 20):
        self._write = write
        self._limit = limit_bytes
        self._queue: deque[tuple[str, int, object]] = deque()
        self._bytes = 0
        self._closing = False
        self._error: BaseException | None = None
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, daemon=True, name="mergelang-write-behind")
        self._thread.start()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:
                    return
                item = self._queue[0]
            try:
                self._write(*item)
            except BaseException as e:
                with self._cond:
                    self._error = e
                    self._queue.clear()
                    self._bytes = 0
                    self._cond.notify_all()
                return
            with self._cond:
                self._queue.popleft()
                self._bytes -= item[2].nbytes
                self._cond.notify_all()

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def put(self, name: str, start: int, data) -> None:
        with self._cond:
            while self._bytes >= self._limit and self._error is None:
                self._cond.wait()
            self._raise()
            self._queue.append((name, start, data))
            self._bytes += data.nbytes
            self._cond.notify_all()

    def close(self) -> None:
        """Wait for every pending write; re-raise a write's error here."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join()
        self._raise()

    def abort(self) -> None:
        with self._cond:
            self._queue.clear()
            self._bytes = 0
            self._closing = True
            self._cond.notify_all()
        self._thread.join()


class Cancelled(Exception):
    """Raised inside a worker whose pool is stopping (another worker failed, or Ctrl-C)."""


def for_each_parallel(items: Iterable[T], work: Callable[[T, Callable[[], None]], None], workers: int) -> None:
    """Call `work(item, check)` for every item on `workers` threads, each taking the next item when
    it is done with one. `check()` raises Cancelled once the pool is stopping: work calls it between
    steps so that a failure or Ctrl-C ends the others soon. The first error is re-raised here, after
    every worker has stopped; the main thread only waits, so Ctrl-C reaches it."""
    pending = iter(items)
    lock = threading.Lock()
    stop = threading.Event()
    errors: list[BaseException] = []

    def check() -> None:
        if stop.is_set():
            raise Cancelled

    def run() -> None:
        try:
            while not stop.is_set():
                with lock:
                    item = next(pending, None)
                if item is None:
                    return
                work(item, check)
        except Cancelled:
            pass
        except BaseException as e:
            errors.append(e)
            stop.set()

    pool = [threading.Thread(target=run, daemon=True, name=f"mergelang-worker-{i}") for i in range(workers)]
    try:
        for t in pool:
            t.start()
        for t in pool:
            while t.is_alive():
                t.join(0.05)  # a timed wait, so a signal handler (Ctrl-C) runs in this thread
    finally:
        stop.set()
        for t in pool:
            if t.ident is not None:  # started (Ctrl-C may come while they are being started)
                t.join()
    if errors:
        raise errors[0]
