"""The safetensors file format: dtype codes, header parsing and validation."""

from __future__ import annotations

import ctypes
import json
import math
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mergelang.lazy import torch

MAX_HEADER_BYTES = 100_000_000
"""Largest header accepted; bigger values mean the file is not safetensors or is corrupt."""

_HEADER_KEYS = ("dtype", "shape", "data_offsets")


class CheckpointError(Exception):
    """A checkpoint file or folder is missing, malformed or inconsistent."""

    def __init__(self, message: str, *, path: Path | None = None, tensor: str | None = None):
        self.message = message
        self.path = Path(path) if path is not None else None
        self.tensor = tensor
        super().__init__(self.__str__())

    def __str__(self) -> str:
        parts = []
        if self.path is not None:
            parts.append(str(self.path))
        if self.tensor is not None:
            parts.append(f"tensor {self.tensor!r}")
        parts.append(self.message)
        return ": ".join(parts)


# Every safetensors dtype code: its torch dtype's name (torch 2.3 and later has them all) and bytes
# per element. Planning needs only the sizes; DTYPES and DTYPE_CODES import torch on first use.
_TORCH_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
}
ITEMSIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}


class _Table(Mapping):
    """A mapping built by `build` when first read."""

    def __init__(self, build):
        self._build, self._table = build, None

    def _items(self) -> dict:
        if self._table is None:
            self._table = self._build()
        return self._table

    def __getitem__(self, key):
        return self._items()[key]

    def __iter__(self):
        return iter(self._items())

    def __len__(self) -> int:
        return len(self._items())


DTYPES: Mapping[str, torch.dtype] = _Table(lambda: {code: getattr(torch, n) for code, n in _TORCH_NAMES.items()})
DTYPE_CODES: Mapping[torch.dtype, str] = _Table(lambda: {dtype: code for code, dtype in DTYPES.items()})


def itemsize(code: str) -> int:
    """Bytes per element of the safetensors dtype `code`."""
    try:
        return ITEMSIZES[code]
    except KeyError:
        raise ValueError(f"unknown safetensors dtype {code!r}; expected one of {', '.join(ITEMSIZES)}") from None


def decode_floats(code: str, data) -> np.ndarray:
    """The float32 values of entries of the float dtype `code` (F64, F32, F16, BF16) stored as `data`
    (little-endian bytes), rounded as torch's `.to(torch.float32)` rounds them."""
    if code == "BF16":  # a bf16 is the high half of the float32 of the same value
        return (np.frombuffer(data, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    if code not in ("F64", "F32", "F16"):
        raise ValueError(f"not a float dtype: {code!r}")
    with np.errstate(over="ignore"):  # an f64 beyond float32's range becomes an infinity, as in torch
        return np.frombuffer(data, dtype=f"<f{ITEMSIZES[code]}").astype(np.float32)


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its dtype code, shape, file and absolute byte range.

    `start` is None for a tensor inside a PyTorch `.bin` pickle, whose data has no fixed offset.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    path: Path
    start: int | None
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def end(self) -> int:
        return self.start + self.nbytes


def byte_view(array) -> memoryview:
    """A byte view of a contiguous CPU tensor's or numpy array's memory (which must outlive it)."""
    if isinstance(array, np.ndarray):
        return memoryview(array.reshape(-1)).cast("B")
    nbytes = array.numel() * array.element_size()
    if nbytes == 0:
        return memoryview(bytearray())
    return memoryview((ctypes.c_ubyte * nbytes).from_address(array.data_ptr())).cast("B")


def _reject_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _describe(value: object) -> str:
    return f"{type(value).__name__} {json.dumps(value)[:60]}" if value is not None else "null"


def _read_exact(fd: int, n: int, offset: int) -> bytes:
    chunks = []
    while n > 0:
        chunk = os.pread(fd, n, offset)
        if not chunk:
            break
        chunks.append(chunk)
        n -= len(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header; returns tensors in data-offset order and `__metadata__`."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise CheckpointError("file not found", path=path) from None
    except OSError as exc:
        raise CheckpointError(f"cannot open file: {exc.strerror}", path=path) from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError("expected a safetensors file, found a folder or special file", path=path)
        size = st.st_size
        if size < 8:
            raise CheckpointError(
                f"expected at least 8 bytes (the header length), but the file has {size} bytes (empty or truncated?)",
                path=path,
            )
        n = int.from_bytes(_read_exact(fd, 8, 0), "little")
        if n > MAX_HEADER_BYTES:
            raise CheckpointError(
                f"header length is {n} bytes, above the {MAX_HEADER_BYTES}-byte limit "
                "(not a safetensors file, or corrupt)",
                path=path,
            )
        if 8 + n > size:
            raise CheckpointError(
                f"header length is {n} bytes, but the file has only {size - 8} bytes after the 8-byte length "
                "(truncated, or not a safetensors file?)",
                path=path,
            )
        raw = _read_exact(fd, n, 8)
    finally:
        os.close(fd)
    if len(raw) != n:
        raise CheckpointError(f"expected {n} header bytes, read {len(raw)} (file changed while reading?)", path=path)
    return _parse_header(raw, path, size)


def _parse_header(raw: bytes, path: Path, size: int) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"header is not valid UTF-8 ({exc.reason} at byte {8 + exc.start})", path=path) from None
    try:
        header = json.loads(text, object_pairs_hook=_reject_duplicates)
    except ValueError as exc:
        raise CheckpointError(f"header is not valid JSON: {exc}", path=path) from None
    if not isinstance(header, dict):
        raise CheckpointError(f"header must be a JSON object, found {type(header).__name__}", path=path)

    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise CheckpointError(
            f"__metadata__ must be an object mapping strings to strings, found {_describe(metadata)}", path=path
        )

    data_start = 8 + len(raw)
    entries = []
    for name, entry in header.items():
        info = _parse_entry(name, entry, path, data_start)
        if info.end > size:
            raise CheckpointError(
                f"data ends at byte {info.end} but the file has {size} bytes (truncated?)", path=path, tensor=name
            )
        entries.append(info)

    entries.sort(key=lambda t: (t.start, t.end))
    last: TensorInfo | None = None
    for info in entries:
        if info.nbytes == 0:
            continue
        if last is not None and info.start < last.end:
            raise CheckpointError(
                f"data bytes [{info.start}, {info.end}) overlap tensor {last.name!r} at [{last.start}, {last.end}); "
                "expected disjoint ranges",
                path=path,
                tensor=info.name,
            )
        if last is None or info.end > last.end:
            last = info
    return {info.name: info for info in entries}, dict(metadata)


def _parse_entry(name: str, entry: object, path: Path, data_start: int) -> TensorInfo:
    def fail(message: str) -> CheckpointError:
        return CheckpointError(message, path=path, tensor=name)

    if not isinstance(entry, dict):
        raise fail(f"expected an object with dtype, shape and data_offsets, found {_describe(entry)}")
    missing = [key for key in _HEADER_KEYS if key not in entry]
    if missing:
        raise fail(f"entry is missing {', '.join(missing)} (expected keys dtype, shape, data_offsets)")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str):
        raise fail(f"dtype must be a string, found {_describe(dtype)}")
    if dtype not in ITEMSIZES:
        raise fail(f"unknown dtype {dtype!r}; expected one of {', '.join(ITEMSIZES)}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise fail(f"shape must be a list of non-negative integers, found {_describe(shape)}")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(_is_int(o) for o in offsets)
        and 0 <= offsets[0] <= offsets[1]
    ):
        raise fail(f"data_offsets must be [begin, end] with 0 <= begin <= end, found {_describe(offsets)}")
    begin, end = offsets
    expected = math.prod(shape) * ITEMSIZES[dtype]
    if expected != end - begin:
        raise fail(
            f"shape {shape} of dtype {dtype} needs {expected} bytes, "
            f"but data_offsets [{begin}, {end}] span {end - begin} bytes"
        )
    return TensorInfo(
        name=name, dtype=dtype, shape=tuple(shape), path=path, start=data_start + begin, nbytes=end - begin
    )
