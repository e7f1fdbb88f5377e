"""PyTorch `.bin` checkpoints, read through `torch.load(weights_only=True)`, a shard or two at a time.

A folder holds `pytorch_model.bin`, or shards `pytorch_model-0000k-of-0000N.bin` listed by
`pytorch_model.bin.index.json` (its weight_map). `torch.load(..., weights_only=True, mmap=True)`
unpickles the state dict's structure and maps the tensor data from the file, so opening a shard
reads the pickle, not the weights. A pickle that weights_only refuses (a global outside torch's
allowlist, such as a class instance) is an error: there is no fallback to unrestricted unpickling.

At most two shards of a checkpoint are mapped at a time (the header pass loads and drops each in
turn): two, so that two workers on either side of a shard boundary do not reload a shard for every
chunk; the executor sets one when a single thread evaluates the tensors in order. A read of a
tensor in another shard drops the one used least recently first (under a lock, as the executor
reads from several threads). Legacy `.bin` files (written before PyTorch 1.6, not zip archives)
cannot be memory-mapped: they are loaded whole, one shard at a time, so switching shards re-reads
a whole file.
"""

from __future__ import annotations

import pickle
import re
from collections import OrderedDict
from pathlib import Path

import numpy as np

from mergelang.arrays import to_numpy
from mergelang.io.checkpoint import Checkpoint, _open_index, element_range, read_config
from mergelang.io.safetensors_format import DTYPE_CODES, CheckpointError, TensorInfo
from mergelang.lazy import torch

BIN_FILE = "pytorch_model.bin"
BIN_INDEX_FILE = "pytorch_model.bin.index.json"
_SHARD_GLOB = "pytorch_model-*.bin"
_ZIP_MAGIC = b"PK\x03\x04"


def has_bin_weights(folder: Path) -> bool:
    """Whether `folder` holds PyTorch `.bin` model weights (single, indexed or stray shards)."""
    folder = Path(folder)
    return (
        (folder / BIN_FILE).is_file()
        or (folder / BIN_INDEX_FILE).is_file()
        or any(p.is_file() for p in folder.glob(_SHARD_GLOB))
    )


def _is_zip(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == _ZIP_MAGIC
    except OSError as exc:
        raise CheckpointError(f"cannot open file: {exc.strerror}", path=path) from exc


def _refusal(text: str) -> str:
    """The reason in torch's weights_only error, without its advice to load unsafely."""
    match = re.search(r"WeightsUnpickler error: ([^\n]*)", text)
    reason = match.group(1) if match else text.strip().splitlines()[0]
    first = re.match(r"(.*?\.)(\s|$)", reason)
    return (first.group(1) if first else reason).rstrip(".")


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The state dict in one `.bin` file: memory-mapped (zip format) or loaded whole (legacy format)."""
    path = Path(path)
    mmap = _is_zip(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" in str(exc):
            raise CheckpointError(
                f"torch.load(weights_only=True) refused this file: {_refusal(str(exc))}; pickles that can "
                "run code are never loaded: convert the checkpoint to safetensors with a tool you trust",
                path=path,
            ) from None
        raise CheckpointError(f"not a readable PyTorch checkpoint: {exc}", path=path) from None
    except OSError as exc:
        raise CheckpointError(f"cannot read file: {exc.strerror or exc}", path=path) from None
    except Exception as exc:  # torch reports damaged archives and pickles with assorted exception types
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"not a readable PyTorch checkpoint (damaged or truncated?): {type(exc).__name__}: {detail}", path=path
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(
            f"expected a state dict (tensor names mapped to tensors), found a {type(state).__name__}", path=path
        )
    for name, value in state.items():
        if not isinstance(name, str):
            raise CheckpointError(f"expected tensor names as keys, found the key {name!r}", path=path)
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"expected a tensor, found {type(value).__name__} {str(value)[:40]}", path=path, tensor=name
            )
        if value.layout != torch.strided or value.dtype not in DTYPE_CODES:
            raise CheckpointError(
                f"unsupported tensor type {value.dtype} ({value.layout}); expected a dense tensor of one of "
                f"{', '.join(str(d) for d in DTYPE_CODES)}",
                path=path,
                tensor=name,
            )
    return state


def _tensor_infos(path: Path) -> dict[str, TensorInfo]:
    """Names, shapes and dtypes of one shard; the shard is dropped before returning."""
    state = load_state_dict(path)
    return {
        name: TensorInfo(name, DTYPE_CODES[t.dtype], tuple(t.shape), path, None, t.numel() * t.element_size())
        for name, t in state.items()
    }


class BinCheckpoint(Checkpoint):
    """A `.bin` checkpoint folder with Checkpoint's interface; holds at most two shards mapped, or
    one legacy shard loaded."""

    mapped_shards = 2  # memory-mapped shards kept at once (1 where a single thread reads in order)

    def __init__(self, path: Path, tensors: dict[str, TensorInfo], files: list[Path], config: dict | None = None):
        super().__init__(path, tensors, files, config)
        self._loaded: OrderedDict[Path, tuple[bool, dict[str, torch.Tensor]]] = OrderedDict()  # path → (mapped, state)
        self._dense: tuple[str, torch.Tensor] | None = None  # the last non-contiguous tensor read, made dense

    @classmethod
    def open(cls, folder: Path) -> BinCheckpoint:
        """Learn every tensor's name, shape and dtype, loading (memory-mapping) one shard at a time."""
        folder = Path(folder)
        if (folder / BIN_FILE).is_file():
            files = [folder / BIN_FILE]
            tensors = _tensor_infos(files[0])
        elif (folder / BIN_INDEX_FILE).is_file():
            files, tensors = _open_index(folder, folder / BIN_INDEX_FILE, _tensor_infos)
        else:
            shards = sorted(p.name for p in folder.glob(_SHARD_GLOB) if p.is_file())
            shown = ", ".join(shards[:3]) + (", ..." if len(shards) > 3 else "")
            raise CheckpointError(
                f"found {len(shards)} .bin shards ({shown}) but no {BIN_INDEX_FILE} saying which tensors each holds",
                path=folder,
            )
        return cls(folder, tensors, files, read_config(folder))

    def read(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Elements [start, stop) of the flattened tensor `name`, as a new 1-D CPU tensor."""
        info, stop = element_range(self.tensors, name, start, stop, f"checkpoint {self.path}")
        with self._lock:
            # info.name, not name: a tied model's lm_head.weight is an alias of its input embeddings
            tensor = self._shard(info.path).get(info.name)
            if tensor is None or tuple(tensor.shape) != info.shape or DTYPE_CODES[tensor.dtype] != info.dtype:
                found = "no such tensor" if tensor is None else f"{DTYPE_CODES[tensor.dtype]} {list(tensor.shape)}"
                raise CheckpointError(
                    f"expected {info.dtype} {list(info.shape)} but found {found} (file changed since it was opened?)",
                    path=info.path,
                    tensor=name,
                )
            return self._flat(info.name, tensor)[start:stop].clone()

    def read_array(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """The same elements as `read`, as a numpy array (arrays.to_numpy)."""
        return to_numpy(self.read(name, start, stop))

    def read_floats(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Elements [start, stop) of the flattened float tensor `name`, as a new float32 numpy array."""
        return self.read(name, start, stop).to(torch.float32).numpy()

    def _flat(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` as 1-D: a view when contiguous, else one dense copy kept for the following chunks."""
        if tensor.is_contiguous():
            return tensor.view(-1)
        if self._dense is None or self._dense[0] != name:
            self._dense = None
            self._dense = (name, tensor.reshape(-1))
        return self._dense[1]

    def _shard(self, path: Path) -> dict[str, torch.Tensor]:
        """The state dict of shard `path`, loading it after dropping those it may not sit beside."""
        if path in self._loaded:
            self._loaded.move_to_end(path)
            return self._loaded[path][1]
        mapped = _is_zip(path)
        limit = self.mapped_shards if mapped and all(m for m, _ in self._loaded.values()) else 1
        while len(self._loaded) >= limit:  # release before mapping the next one
            self._loaded.popitem(last=False)
        self._dense = None
        state = load_state_dict(path)
        self._loaded[path] = (mapped, state)
        return state

    def close(self) -> None:
        """Drop the loaded shards (a later read loads them again)."""
        with self._lock:
            self._loaded.clear()
            self._dense = None
