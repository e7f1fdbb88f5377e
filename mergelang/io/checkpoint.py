"""Lazy, thread-safe access to a safetensors checkpoint folder (single file or sharded)."""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import threading
from pathlib import Path
from typing import Callable

import numpy as np

from mergelang.arrays import NUMPY_DTYPES, to_torch
from mergelang.io.safetensors_format import ITEMSIZES, CheckpointError, TensorInfo, decode_floats, read_header
from mergelang.lazy import torch
from mergelang.memory import libc_function

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"


def _pread_into(fd: int, buf: memoryview, offset: int) -> int:
    """Fill `buf` from `fd` at `offset`; returns the number of bytes read (less only at end of file)."""
    done = 0
    total = len(buf)
    while done < total:
        if hasattr(os, "preadv"):
            got = os.preadv(fd, [buf[done:]], offset + done)
        else:
            chunk = os.pread(fd, total - done, offset + done)
            got = len(chunk)
            buf[done : done + got] = chunk
        if got == 0:
            break
        done += got
    return done


def map_range(fd: int, offset: int, nbytes: int) -> np.ndarray | None:
    """Bytes [offset, offset + nbytes) of the file as a uint8 numpy array over a private mapping,
    which is unmapped when the array and its views are freed; None where the file cannot be mapped.

    A mapped read costs less than a copied one: the file's pages are in the page cache (or are read
    there once, ahead of use: MADV_WILLNEED), and mapping them touches no fresh memory, where a
    copy first faults in and zeroes its buffer. A value kept whole is then the cached pages
    themselves, and a range read again in a later pass is mapped again, not copied again. Writing
    to the array copies the pages written, never the file. The caller checks that the range lies
    within the file: mapped bytes past its end fault when touched.
    """
    base = offset - offset % mmap.ALLOCATIONGRANULARITY
    try:
        mapping = mmap.mmap(fd, offset + nbytes - base, access=mmap.ACCESS_COPY, offset=base)
    except (OSError, ValueError):
        return None
    array = np.frombuffer(mapping, dtype=np.uint8, count=nbytes, offset=offset - base)
    _read_ahead(mapping, array.ctypes.data - (offset - base))
    return array


# libc's madvise through ctypes, which releases the GIL for the call; None where there is none.
_MADVISE = (libc_function("madvise", ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
            if hasattr(mmap, "MADV_WILLNEED") else None)


def _read_ahead(mapping: mmap.mmap, address: int) -> None:
    """MADV_WILLNEED over the mapping (at `address`): the kernel reads its start ahead (one window,
    8 MB here), and its own read-ahead follows the loop's faults. (Advising a whole tensor 4 MB at
    a time made a dare_linear run from evicted inputs slower: 4.87 -> 5.08 s.) Even over cached
    pages the call walks the range, 0.1-0.5 ms for a 22 MB tensor: mmap.madvise holds the GIL
    meanwhile (0.13 s of the workers' Python in a ties run, other threads waiting); the ctypes
    call does not."""
    if _MADVISE is not None:
        _MADVISE(address, len(mapping), mmap.MADV_WILLNEED)  # advice: a failure changes nothing
    elif hasattr(mapping, "madvise") and hasattr(mmap, "MADV_WILLNEED"):
        mapping.madvise(mmap.MADV_WILLNEED)


def _load_json(path: Path, what: str) -> object:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CheckpointError(f"cannot read {what}: {exc.strerror}", path=path) from exc
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{what} is not valid UTF-8 ({exc.reason})", path=path) from None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise CheckpointError(f"{what} is not valid JSON: {exc}", path=path) from None


def read_config(folder: Path) -> dict | None:
    """The folder's config.json as a dict, or None when there is none."""
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        return None
    config = _load_json(config_path, CONFIG_FILE)
    if not isinstance(config, dict):
        raise CheckpointError(f"{CONFIG_FILE} must hold a JSON object, found {type(config).__name__}", path=config_path)
    return config


def element_range(tensors: dict[str, TensorInfo], name: str, start: int, stop: int | None,
                  where: str) -> tuple[TensorInfo, int]:
    """The info of tensor `name` and the end of the element range [start, stop) (None: to the end),
    checked against its size: the common first step of every source's `read`."""
    try:
        info = tensors[name]
    except KeyError:
        raise KeyError(f"no tensor named {name!r} in {where}") from None
    stop = info.numel if stop is None else stop
    if not (0 <= start <= stop <= info.numel):
        raise ValueError(f"range [{start}, {stop}) is out of bounds for tensor {name!r} with {info.numel} elements")
    return info, stop


class Checkpoint:
    """A checkpoint folder: tensor locations from the headers, data mapped on demand."""

    def __init__(
        self,
        path: Path,
        tensors: dict[str, TensorInfo],
        files: list[Path],
        config: dict | None = None,
    ):
        self.path = Path(path)
        self.tensors = tensors
        self.files = files
        self.config = config
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()

    @classmethod
    def open(cls, folder: Path) -> Checkpoint:
        """Read the headers of the checkpoint in `folder` (no tensor data is read).

        safetensors weights are preferred; a folder with only PyTorch `.bin` weights opens as a
        `BinCheckpoint` (io/torch_bin.py), which has the same interface.
        """
        folder = Path(folder)
        if not folder.exists():
            raise CheckpointError("checkpoint folder not found", path=folder)
        if not folder.is_dir():
            hint = "; pass the folder that holds it" if folder.suffix == ".safetensors" else ""
            raise CheckpointError(f"expected a checkpoint folder, found a file{hint}", path=folder)

        if (folder / SINGLE_FILE).is_file():
            files = [folder / SINGLE_FILE]
            tensors = read_header(files[0])[0]
        elif (folder / INDEX_FILE).is_file():
            files, tensors = _open_index(folder, folder / INDEX_FILE)
        else:
            candidates = sorted(p for p in folder.glob("*.safetensors") if p.is_file() and not p.name.startswith("."))
            if len(candidates) == 1:
                files = candidates
                tensors = read_header(files[0])[0]
            elif candidates:
                names = ", ".join(p.name for p in candidates[:5]) + (", ..." if len(candidates) > 5 else "")
                raise CheckpointError(
                    f"found {len(candidates)} .safetensors files ({names}) but no {INDEX_FILE} "
                    "saying which tensors each holds",
                    path=folder,
                )
            else:
                from mergelang.io.torch_bin import BinCheckpoint, has_bin_weights

                if has_bin_weights(folder):
                    return BinCheckpoint.open(folder)
                raise CheckpointError(_no_weights_message(folder), path=folder)
        config = read_config(folder)
        return cls(folder, tensors, files, config)

    def read(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Elements [start, stop) of the flattened tensor `name`, as a 1-D CPU tensor over
        `read_array`'s memory."""
        array = self.read_array(name, start, stop)  # first: it says what is wrong with the name or range
        return to_torch(array, self.tensors[name].dtype)

    def read_array(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Elements [start, stop) of the flattened tensor `name`, as a 1-D numpy array in its stored
        dtype (arrays.NUMPY_DTYPES: a bfloat16 as its bits).

        The array maps the file's range privately (see `map_range`); where the file cannot be
        mapped, the range is read into fresh memory with pread.
        """
        info, offset, nbytes = self._byte_range(name, start, stop)
        dtype = NUMPY_DTYPES[info.dtype]
        if nbytes == 0:
            return np.empty(0, dtype=dtype)
        size = ITEMSIZES[info.dtype]
        fd = self._fd(info.path)
        # Mapped bytes past the end of the file would fault when touched, not fail here.
        got = min(nbytes, max(0, os.fstat(fd).st_size - offset))
        if got == nbytes:
            # An entry misaligned in the file (a header of odd length) cannot be viewed in place.
            mapped = map_range(fd, offset, nbytes) if offset % size == 0 else None
            if mapped is not None:
                return mapped.view(dtype)
            out = np.empty(nbytes, dtype=np.uint8)
            got = _pread_into(fd, memoryview(out), offset)
        _check_read(info, name, offset, nbytes, got)
        return out.view(dtype)

    def read_floats(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Elements [start, stop) of the flattened float tensor `name`, as a new float32 numpy array
        (read with pread: `check` samples deltas this way without importing torch)."""
        info, offset, nbytes = self._byte_range(name, start, stop)
        data = bytearray(nbytes)
        _check_read(info, name, offset, nbytes, _pread_into(self._fd(info.path), memoryview(data), offset))
        return decode_floats(info.dtype, data)

    def _byte_range(self, name: str, start: int, stop: int | None) -> tuple[TensorInfo, int, int]:
        """The tensor's info, and the file offset and byte length of its elements [start, stop)."""
        info, stop = element_range(self.tensors, name, start, stop, f"checkpoint {self.path}")
        size = ITEMSIZES[info.dtype]
        return info, info.start + start * size, (stop - start) * size

    def _fd(self, path: Path) -> int:
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                try:
                    fd = os.open(path, os.O_RDONLY)
                except OSError as exc:
                    raise CheckpointError(f"cannot open file: {exc.strerror}", path=path) from exc
                self._fds[path] = fd
            return fd

    def close(self) -> None:
        """Close the cached file descriptors (a later read reopens them)."""
        with self._lock:
            fds = list(self._fds.values())
            self._fds.clear()
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, {len(self.tensors)} tensors, {len(self.files)} files)"


def _check_read(info: TensorInfo, name: str, offset: int, nbytes: int, got: int) -> None:
    if got != nbytes:
        raise CheckpointError(
            f"expected {nbytes} bytes at byte {offset}, but only {got} could be read "
            "(file truncated or changed since it was opened?)",
            path=info.path,
            tensor=name,
        )


def _no_weights_message(folder: Path) -> str:
    message = (
        f"no weights found (looked for {SINGLE_FILE}, {INDEX_FILE}, *.safetensors, "
        "pytorch_model.bin and pytorch_model.bin.index.json)"
    )
    bins = sorted(p.name for p in folder.glob("*.bin") if p.is_file())
    if bins:
        shown = ", ".join(bins[:3]) + (", ..." if len(bins) > 3 else "")
        message += f"; found {shown}, which is not a model's weights file name"
    return message


def _open_index(
    folder: Path,
    index_path: Path,
    read_tensors: Callable[[Path], dict[str, TensorInfo]] = lambda file: read_header(file)[0],
) -> tuple[list[Path], dict[str, TensorInfo]]:
    """Shard files and tensors of a sharded checkpoint, checked against the index's weight_map."""
    index_name = index_path.name
    index = _load_json(index_path, index_name)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        found = "no weight_map" if isinstance(index, dict) else f"a JSON {type(index).__name__}"
        raise CheckpointError(f"expected an object with a weight_map object, found {found}", path=index_path)
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard:
            raise CheckpointError(
                f"weight_map must map tensor names to shard file names, found {shard!r} for {name!r}",
                path=index_path,
            )
        if Path(shard).is_absolute() or ".." in Path(shard).parts:
            raise CheckpointError(
                f"weight_map names shard {shard!r} outside the checkpoint folder (for tensor {name!r})",
                path=index_path,
            )

    files = [folder / shard for shard in sorted(set(weight_map.values()))]
    for file in files:
        if not file.is_file():
            mapped = [n for n, s in weight_map.items() if folder / s == file]
            raise CheckpointError(
                f"weight_map names shard {file.name!r} (for {len(mapped)} tensors, e.g. {mapped[0]!r}) "
                "but that file does not exist",
                path=index_path,
            )

    tensors: dict[str, TensorInfo] = {}
    for file in files:
        try:
            found = read_tensors(file)
        except CheckpointError as exc:
            if exc.tensor is None:
                mapped = [n for n, s in weight_map.items() if folder / s == file]
                exc.message += f" (the index maps {len(mapped)} tensors to this file, e.g. {mapped[0]!r})"
            raise
        for name, info in found.items():
            if name in tensors:
                raise CheckpointError(
                    f"present in two shards: {tensors[name].path.name} and {file.name}", path=file, tensor=name
                )
            tensors[name] = info
    for name, shard in weight_map.items():
        info = tensors.get(name)
        if info is None or info.path != folder / shard:
            where = f"it is in {info.path.name}" if info is not None else "no shard has it"
            raise CheckpointError(
                f"{index_name} maps this tensor to {shard}, which does not contain it ({where})",
                path=folder / shard,
                tensor=name,
            )
    return files, tensors
