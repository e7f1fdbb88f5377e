"""sha256 of input files: cached by file identity, read from Hugging Face blob names, computed in the background.

A merge reads every input once; hashing them again for the model card would double the I/O on a
cold page cache. So hashes are computed on a background thread while the merge runs (hashlib
releases the GIL while it digests a large block), remembered in a small cache keyed by
(st_dev, st_ino, size, mtime_ns), and not computed at all for files in a Hugging Face hub cache,
whose blobs are named by their sha256.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path

from mergelang.io.safetensors_format import CheckpointError
from mergelang.paths import cache_dir

BLOCK = 8 << 20  # bytes per hashlib update: large enough that the GIL is released for most of the time
_SHA256 = re.compile(r"[0-9a-f]{64}")
CACHE_FILE = "sha256-cache.json"
CACHE_LIMIT = 20_000  # entries kept; the oldest are dropped first


@dataclass(frozen=True)
class FileHash:
    size: int
    sha256: str


def hub_blob_sha256(path: Path) -> str | None:
    """The sha256 a Hugging Face hub cache names a blob by, for a file that links to one."""
    real = Path(os.path.realpath(path))
    if real.parent.name == "blobs" and _SHA256.fullmatch(real.name):
        return real.name
    return None


class Stopped(Exception):
    """Hashing was cancelled."""


def sha256_file(path: Path, stop: threading.Event | None = None) -> str:
    digest = hashlib.sha256()
    buf = bytearray(BLOCK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            digest.update(view[:n])
            if stop is not None and stop.is_set():
                raise Stopped()
    return digest.hexdigest()


class HashCache:
    """sha256 by file identity, in one JSON file. Reading or writing it never fails a merge."""

    def __init__(self, folder: Path | None = None):
        self.path = (folder or cache_dir()) / CACHE_FILE
        self.entries: dict[str, str] = {}
        self.dirty = False
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if isinstance(data, dict):
                self.entries = {k: v for k, v in data.items() if isinstance(v, str) and _SHA256.fullmatch(v)}
        except (OSError, ValueError):
            pass

    @staticmethod
    def key(st: os.stat_result) -> str:
        return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"

    def get(self, st: os.stat_result) -> str | None:
        return self.entries.get(self.key(st))

    def put(self, st: os.stat_result, sha256: str) -> None:
        key = self.key(st)
        if self.entries.get(key) != sha256:
            self.entries.pop(key, None)
            self.entries[key] = sha256  # most recent last
            self.dirty = True

    def save(self) -> None:
        if not self.dirty:
            return
        entries = dict(list(self.entries.items())[-CACHE_LIMIT:])
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{secrets.token_hex(4)}")
            try:
                tmp.write_text(json.dumps(entries), encoding="utf-8")
                os.replace(tmp, self.path)
            finally:
                if tmp.exists():
                    tmp.unlink()
            self.dirty = False
        except OSError:
            pass


def hash_file(path: Path, cache: HashCache | None, *, fresh: bool = False,
              stop: threading.Event | None = None) -> FileHash:
    """The size and sha256 of a file. `fresh` always reads the bytes (the result still updates the cache)."""
    try:
        st = os.stat(path)
        if not fresh:
            known = hub_blob_sha256(path) or (cache.get(st) if cache is not None else None)
            if known is not None:
                return FileHash(st.st_size, known)
        sha = sha256_file(path, stop)
        after = os.stat(path)
    except FileNotFoundError:
        raise CheckpointError("file not found", path=path) from None
    except OSError as e:
        raise CheckpointError(f"cannot read file: {e.strerror or e}", path=path) from None
    if cache is not None and HashCache.key(after) == HashCache.key(st):
        cache.put(st, sha)
    return FileHash(st.st_size, sha)


class BackgroundHasher:
    """Hashes files on a daemon thread; `result()` waits and returns {path: FileHash} or raises."""

    def __init__(self, paths: list[Path], cache: HashCache | None = None):
        self.paths = list(dict.fromkeys(Path(p) for p in paths))
        self.cache = cache if cache is not None else HashCache()
        self.stop = threading.Event()
        self.hashes: dict[Path, FileHash] = {}
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="mergelang-hash", daemon=True)

    def start(self) -> BackgroundHasher:
        self.thread.start()
        return self

    def _run(self) -> None:
        try:
            for p in self.paths:
                self.hashes[p] = hash_file(p, self.cache, stop=self.stop)
        except BaseException as e:  # handed to result()
            self.error = e
        finally:
            if not self.stop.is_set():
                self.cache.save()

    def result(self) -> dict[Path, FileHash]:
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.hashes

    def cancel(self) -> None:
        self.stop.set()
        self.thread.join()
