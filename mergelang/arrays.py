"""The two kinds of array the executor passes around, and the one boundary between them.

On the CPU, the native path (native_regions, tapped, select's first pass, the writer) works on
numpy arrays: a checkpoint's mapped bytes viewed in their stored dtype (a bfloat16 as its uint16
bits, as the loops read it), the loops' float32 or bfloat16 results, the cutoffs and buffers of a
top-k select. None of them needs torch, so a merge whose regions all run as loops never imports it
(1-1.5 s of one core: lazy.py). Everything else computes with torch: the eager kernels, compiled
regions and GPUs. `to_torch` is where a numpy value meets them: it views the same memory, copying
nothing, so both sides see the same bits.
"""

from __future__ import annotations

import math
import sys

import numpy as np

from .lazy import torch

# How a stored dtype's entries are viewed in numpy: bfloat16 (no numpy dtype) as its bits.
NUMPY_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "F8_E4M3": np.uint8, "F8_E5M2": np.uint8,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
}
# The stored dtypes whose numpy view is not the torch dtype of the same name: their bits.
_BITS = {"BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def is_torch(value) -> bool:
    """Whether value is a torch tensor (asked without importing torch)."""
    module = sys.modules.get("torch")
    return module is not None and isinstance(value, module.Tensor)


def device_type(device) -> str:
    """"cpu" or "cuda" for a device given as a string ("cuda:1") or a torch.device."""
    return str(device).split(":")[0]


def numel(value) -> int:
    return math.prod(value.shape)


_TORCH_NAMES = {"torch.bfloat16": "uint16", "torch.float32": "float32", "torch.int64": "int64"}


def cpu_dtype(value) -> str | None:
    """The numpy name of the dtype of a contiguous CPU array or tensor ("float32", "int64", "uint16"
    for a bfloat16's bits, ...), as a loop reads it; None for anything else (another device, a
    strided view, not an array). A torch tensor of another dtype than those is None too."""
    if isinstance(value, np.ndarray):
        return value.dtype.name if value.flags.c_contiguous else None
    if is_torch(value) and value.device.type == "cpu" and value.is_contiguous():
        return _TORCH_NAMES.get(str(value.dtype))
    return None


def to_torch(value, code: str | None = None):
    """value as a torch tensor: a numpy array's memory viewed (its stored dtype `code` where its
    numpy view holds bits: a bfloat16's uint16), a torch tensor as it is."""
    if not isinstance(value, np.ndarray):
        return value
    tensor = torch.from_numpy(value)  # the executor's arrays are writable (mapped copy-on-write)
    if code in _BITS and value.dtype == NUMPY_DTYPES[code]:  # (a LoRA delta is float32 whatever its base's dtype)
        return tensor.view(getattr(torch, _BITS[code]))
    return tensor


def to_numpy(value):
    """A CPU tensor as a numpy array over its memory, in its safetensors dtype's numpy view (a
    bfloat16 as its bits); a numpy array as it is."""
    if isinstance(value, np.ndarray):
        return value
    if value.dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2):
        bits = torch.int16 if value.element_size() == 2 else torch.uint8
        return value.view(bits).numpy().view(np.uint16 if value.element_size() == 2 else np.uint8)
    return value.numpy()
