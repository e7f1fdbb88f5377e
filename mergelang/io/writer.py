"""Streaming sharded safetensors writer: headers laid out up front, data written in place with pwrite."""

from __future__ import annotations

import json
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mergelang.arrays import NUMPY_DTYPES, numel
from mergelang.io.output_file import OutputFile, Staging, direct_io_default, pwrite_all
from mergelang.io.safetensors_format import DTYPES, ITEMSIZES, byte_view, itemsize

INDEX_FILE = "model.safetensors.index.json"


class Sized:
    """numel and nbytes of anything with a `shape` and a safetensors `dtype` code."""

    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * itemsize(self.dtype)


@dataclass(frozen=True)
class OutputTensor(Sized):
    """A tensor to be written: its name, safetensors dtype code and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]


def plan_shards(tensors: list[OutputTensor], shard_size: int) -> list[list[OutputTensor]]:
    """Group tensors greedily, in order, into shards of at most `shard_size` bytes each.

    A tensor larger than `shard_size` gets a shard of its own. With sizes in bytes:
    [4, 4, 4] at 8 -> [[4, 4], [4]]; [4, 20, 4] at 8 -> [[4], [20], [4]].
    """
    if shard_size <= 0:
        raise ValueError(f"shard_size must be a positive number of bytes, got {shard_size}")
    shards: list[list[OutputTensor]] = []
    current: list[OutputTensor] = []
    current_bytes = 0
    for tensor in tensors:
        if current and current_bytes + tensor.nbytes > shard_size:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(tensor)
        current_bytes += tensor.nbytes
    if current:
        shards.append(current)
    return shards


def shard_file_names(n: int) -> list[str]:
    """File names for `n` shards, in the Hugging Face style."""
    if n < 1:
        raise ValueError(f"the number of shards must be at least 1, got {n}")
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


@dataclass
class _Shard:
    path: Path
    header: bytes
    size: int
    tensors: list[OutputTensor]
    file: OutputFile | None = None


@dataclass(frozen=True)
class _Slot:
    tensor: OutputTensor
    shard: _Shard
    start: int


def _missing_range(intervals: list[tuple[int, int]], numel: int) -> tuple[int, int] | None:
    covered = 0
    for start, stop in sorted(intervals):
        if start > covered:
            return covered, start
        covered = max(covered, stop)
    return (covered, numel) if covered < numel else None


class ShardedWriter:
    """Writes tensors into pre-laid-out safetensors shards, chunk by chunk, in any order, each element once.

    Inside a shard, data is laid out widest dtype first, so each tensor is aligned to its item size.
    """

    def __init__(
        self,
        folder: Path,
        tensors: list[OutputTensor],
        shard_size: int,
        metadata: dict[str, str] | None = None,
        direct_io: bool | None = None,
    ):
        self.folder = Path(folder)
        self.metadata = {"format": "pt", **(metadata or {})}
        for key, value in self.metadata.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise ValueError(f"metadata must map strings to strings, got {key!r}: {value!r}")
        seen: set[str] = set()
        for tensor in tensors:
            if tensor.name in seen:
                raise ValueError(f"tensor {tensor.name!r} is listed twice")
            if tensor.name == "__metadata__":
                raise ValueError("'__metadata__' is reserved and cannot be a tensor name")
            if tensor.dtype not in ITEMSIZES:
                raise ValueError(
                    f"tensor {tensor.name!r}: unknown dtype {tensor.dtype!r}; expected one of {', '.join(ITEMSIZES)}"
                )
            if not all(isinstance(d, int) and d >= 0 for d in tensor.shape):
                raise ValueError(f"tensor {tensor.name!r}: shape must be non-negative integers, got {tensor.shape}")
            seen.add(tensor.name)
        self.tensors = list(tensors)
        self.shards = plan_shards(self.tensors, shard_size) or [[]]
        self._shards: list[_Shard] = []
        self._slots: dict[str, _Slot] = {}
        for name, group in zip(shard_file_names(len(self.shards)), self.shards, strict=True):
            self._layout(self.folder / name, group)
        self._written: dict[str, list[tuple[int, int]]] = {t.name: [] for t in self.tensors}
        self._lock = threading.Lock()
        self._staging = Staging() if (direct_io_default() if direct_io is None else direct_io) else None
        self._state = "new"

    def _layout(self, path: Path, group: list[OutputTensor]) -> None:
        # Wider dtypes first, so every tensor's data is aligned to its item size.
        group = sorted(group, key=lambda t: -itemsize(t.dtype))
        header: dict[str, object] = {"__metadata__": self.metadata}
        offset = 0
        for tensor in group:
            header[tensor.name] = {
                "dtype": tensor.dtype,
                "shape": list(tensor.shape),
                "data_offsets": [offset, offset + tensor.nbytes],
            }
            offset += tensor.nbytes
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        header_bytes = len(raw).to_bytes(8, "little") + raw
        shard = _Shard(path=path, header=header_bytes, size=len(header_bytes) + offset, tensors=group)
        self._shards.append(shard)
        position = len(header_bytes)
        for tensor in group:
            self._slots[tensor.name] = _Slot(tensor, shard, position)
            position += tensor.nbytes

    @property
    def files(self) -> list[Path]:
        return [shard.path for shard in self._shards]

    @property
    def total_bytes(self) -> int:
        """Bytes of tensor data to be written (headers and index not included)."""
        return sum(t.nbytes for t in self.tensors)

    def open(self) -> None:
        """Create every shard, write its header and set its final size."""
        if self._state != "new":
            raise RuntimeError(f"cannot open: writer is {self._state_text()}")
        self._state = "open"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            for shard in self._shards:
                shard.file = OutputFile(shard.path, shard.size, self._staging)
                shard.file.write(memoryview(shard.header), 0)
        except BaseException:
            self.abort()
            raise

    def write(self, name: str, start: int, data) -> None:
        """Write `data` (flattened, in the tensor's dtype: a CPU torch tensor, or a numpy array in the
        dtype's numpy view, arrays.NUMPY_DTYPES) as elements [start, start + numel) of `name`."""
        if self._state != "open":
            raise RuntimeError(f"cannot write tensor {name!r}: writer is {self._state_text()}")
        try:
            slot = self._slots[name]
        except KeyError:
            raise KeyError(f"tensor {name!r} is not among the tensors this writer lays out") from None
        code = slot.tensor.dtype
        if isinstance(data, np.ndarray):
            expected, contiguous = np.dtype(NUMPY_DTYPES[code]), data.flags.c_contiguous
        else:
            expected, contiguous = DTYPES[code], data.is_contiguous()
            if data.device.type != "cpu":
                raise ValueError(f"tensor {name!r}: data must be on the CPU, got {data.device}")
        if data.dtype != expected:
            raise ValueError(f"tensor {name!r} is stored as {code} ({expected}), got data of {data.dtype}")
        if not contiguous:
            raise ValueError(f"tensor {name!r}: data must be contiguous")
        count, total = numel(data), slot.tensor.numel
        if start < 0 or start + count > total:
            raise ValueError(
                f"tensor {name!r}: elements [{start}, {start + count}) are out of bounds for {total} elements"
            )
        if count:
            offset = slot.start + start * ITEMSIZES[code]
            slot.shard.file.write(byte_view(data), offset)
        with self._lock:
            self._written[name].append((start, start + count))

    def close(self) -> None:
        """Check every element was written, fsync and close the shards, and write the index if sharded."""
        if self._state == "closed":
            return
        if self._state != "open":
            raise RuntimeError(f"cannot close: writer is {self._state_text()}")
        for tensor in self.tensors:
            missing = _missing_range(self._written[tensor.name], tensor.numel)
            if missing is not None:
                self.abort()
                raise RuntimeError(
                    f"tensor {tensor.name!r} is incomplete: elements [{missing[0]}, {missing[1]}) "
                    f"of {tensor.numel} were never written"
                )
        try:
            for shard in self._shards:
                shard.file.close()
            if len(self._shards) > 1:
                self._write_index()
            self._fsync_folder()
        except BaseException:
            self.abort()
            raise
        self._state = "closed"

    def _write_index(self) -> None:
        index = {
            "metadata": {"total_size": self.total_bytes},
            "weight_map": {t.name: self._slots[t.name].shard.path.name for t in self.tensors},
        }
        data = (json.dumps(index, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
        fd = os.open(self.folder / INDEX_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            pwrite_all(fd, memoryview(data), 0)
            os.fsync(fd)
        finally:
            os.close(fd)

    def _fsync_folder(self) -> None:
        try:
            fd = os.open(self.folder, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)

    def abort(self) -> None:
        """Close every open shard without checks (the files are left incomplete)."""
        if self._state == "closed":
            return
        for shard in self._shards:
            if shard.file is not None:
                shard.file.abort()
        self._state = "aborted"

    def _state_text(self) -> str:
        return {
            "new": "not open yet",
            "open": "open",
            "closed": "already closed",
            "aborted": "aborted",
        }[self._state]

    def __enter__(self) -> ShardedWriter:
        self.open()
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
