"""Compiled loops kept as machine code on disk and called without importing numba.

Importing numba takes 0.2-0.35 s of one core, and loading the first loop from its cache 0.15 s
more (its compiler's tables), at the start of every run, holding the GIL. So each loop (each of
native_loops' and each region's) is compiled once per machine by numba as a C function over raw
pointers (a `cfunc` around the loop: entry_build.py), and its object code is kept in the cache
folder (MERGELANG_CACHE_DIR, ...: loops/<digest>.o). A run links those objects into memory with
llvmlite's JIT linker in about 30 ms in all, numba left unimported: their outside symbols are
Python's C API (found in the process), numba's helper functions and its runtime's allocator (the
extension modules `numba._helperlib` and `numba.core.runtime._nrt_python`, loaded on their own in
a millisecond: their `c_helpers` hold the addresses), and only those. ctypes makes the calls,
releasing the GIL as numba's nogil loops do.

The digest covers the loop's source, its C signature, this machine's CPU (numba compiles for the
host's features), numba's NUMBA_* settings and the helper libraries' files (a numba reinstalled
compiles anew). An object that is unreadable or changed (a checksum in its header), or that needs
a symbol no library here defines, is compiled anew; where that fails too, or where no object can be
linked (no llvmlite, a platform whose objects it cannot load), the loop runs as numba's own
dispatcher, which computes the same bits.

Types of a loop's arguments, in its C signature: "u16[]", "u32[]", "u64[]", "i64[]", "f32[]" (a
C-contiguous 1-D array: its data pointer and length), "i64[,]" (2-D: the pointer and both
extents), and the scalars "u32", "u64", "i64", "f32". Results: None, "bool", "i64", or "i64,i64"
(a pair, written through a pointer).
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.machinery
import importlib.util
import json
import logging
import os
import sys
import threading
from importlib.util import find_spec
from pathlib import Path

import numpy as np

from ..paths import cache_folders, write_into

log = logging.getLogger(__name__)

FORMAT = 1  # of the cached objects: their header and calling convention
ARRAY_DTYPES = {"u16": np.uint16, "u32": np.uint32, "u64": np.uint64, "i64": np.int64, "f32": np.float32}
SCALARS = {"u32": ctypes.c_uint32, "u64": ctypes.c_uint64, "i64": ctypes.c_int64, "f32": ctypes.c_float}
RESULTS = {None: None, "bool": ctypes.c_uint8, "i64": ctypes.c_int64, "i64,i64": None}
HELPERS = (("numba._helperlib", "_helperlib", "numba_"),
           ("numba.core.runtime._nrt_python", "core/runtime/_nrt_python", "NRT_"))


class Unavailable(Exception):
    """No object of this loop can be linked here (the dispatcher runs instead)."""


def array_type(t: str) -> tuple[type, int] | None:
    """(numpy dtype, dimensions) of an array type, None for a scalar."""
    if not t.endswith("]"):
        return None
    base, dims = t[:-1].split("[")
    return ARRAY_DTYPES[base], dims.count(",") + 1


def _pointer(value, t: str, dtype, ndim: int) -> tuple[int, tuple]:
    """(data pointer, extents) of an array argument of type t: a C-contiguous CPU numpy array or
    torch tensor of its element size (the loop reads its bits: a float32 chunk is a u32[] array),
    whose extent is its number of entries where t is 1-D (torch's data_ptr costs 0.1 us, numpy's
    ctypes.data 1-3 us)."""
    size = np.dtype(dtype).itemsize
    if type(value) is np.ndarray:
        if value.itemsize == size and value.flags.c_contiguous:
            if ndim == 1:
                return value.ctypes.data, (value.size,)
            if value.ndim == ndim:
                return value.ctypes.data, value.shape
    elif hasattr(value, "data_ptr") and value.is_contiguous() and value.device.type == "cpu" \
            and value.element_size() == size:
        if ndim == 1:
            return value.data_ptr(), (value.numel(),)
        if value.dim() == ndim:
            return value.data_ptr(), tuple(value.shape)
    raise TypeError(f"a loop wants a contiguous {t} array, got {getattr(value, 'dtype', type(value).__name__)} "
                    f"{tuple(getattr(value, 'shape', ()))}")


class Entry:
    """A linked loop, called with arrays (numpy's, or torch's: _pointer) and numbers, as its numba
    dispatcher is."""

    def __init__(self, address: int, types: tuple[str, ...], result: str | None):
        self.types, self.result = types, result
        self._arrays = [array_type(t) for t in types]
        c = []
        for t, a in zip(types, self._arrays):
            c += [ctypes.c_void_p] + [ctypes.c_int64] * a[1] if a else [SCALARS[t]]
        if result == "i64,i64":
            c += [ctypes.c_void_p, ctypes.c_int64]
        self._function = ctypes.CFUNCTYPE(RESULTS[result], *c)(address)

    def __call__(self, *args):
        if len(args) != len(self.types):
            raise TypeError(f"a loop of {len(self.types)} arguments called with {len(args)}")
        c = []
        for value, t, a in zip(args, self.types, self._arrays):
            if a is None:
                c.append(value)
                continue
            address, extents = _pointer(value, t, *a)
            c.append(address)
            c += extents
        if self.result == "i64,i64":
            pair = np.zeros(2, dtype=np.int64)
            self._function(*c, pair.ctypes.data, 2)
            return int(pair[0]), int(pair[1])
        r = self._function(*c)
        return bool(r) if self.result == "bool" else r


class Dispatched:
    """numba's dispatcher of a loop that has no linked entry, called as an Entry is: arrays become
    numpy arrays of the argument's type first."""

    def __init__(self, function, types: tuple[str, ...]):
        self.function, self.types = function, types
        self._arrays = [array_type(t) for t in types]

    def __call__(self, *args):
        return self.function(*(value if a is None else _as_numpy(value, t, *a)
                               for value, t, a in zip(args, self.types, self._arrays)))


def _as_numpy(value, t: str, dtype, ndim: int):
    _pointer(value, t, dtype, ndim)  # the same checks as an Entry's
    if type(value) is not np.ndarray:
        from ..arrays import to_numpy

        value = to_numpy(value)
    array = value.view(dtype)
    return array.reshape(-1) if ndim == 1 else array


_lock = threading.Lock()  # linking: one object at a time
_setup_lock = threading.Lock()
_engines: list = []  # every engine linked: their code stays mapped for the process
_state: dict = {}  # "llvm": llvmlite.binding, "stamp": what the digest takes from this machine


def _setup():
    """llvmlite, with numba's helpers found; raises Unavailable where it cannot be (once per process,
    the first thread to ask doing it)."""
    with _setup_lock:
        if "llvm" not in _state:
            _set_up()
        return _state["llvm"]


def _set_up() -> None:
    try:
        import llvmlite
        import llvmlite.binding as llvm

        stamp = [f"format {FORMAT}", f"llvmlite {llvmlite.__version__}"]
        spec = find_spec("numba")  # a top-level name: nothing is imported
        if spec is None or not spec.submodule_search_locations:
            raise Unavailable("numba is not installed")
        folder = Path(spec.submodule_search_locations[0])
        symbols = {}
        for name, relative, prefix in HELPERS:
            module, path = _extension(name, folder / relative)
            st = path.stat()
            stamp.append(f"{path.name} {st.st_size} {st.st_mtime_ns}")
            symbols.update((key if key.startswith("_") else prefix + key, address)
                           for key, address in module.c_helpers.items())
        process = ctypes.CDLL(None)  # the symbols the process has loaded (Python's C API among them)
        llvm.initialize_native_target()
        llvm.initialize_native_asmprinter()
        stamp += [llvm.get_process_triple(), llvm.get_host_cpu_name(), llvm.get_host_cpu_features().flatten()]
        stamp += sorted(f"{k}={v}" for k, v in os.environ.items() if k.startswith("NUMBA_"))
    except Unavailable:
        raise
    except Exception as error:  # noqa: BLE001 - no llvmlite, or numba's helpers cannot load
        raise Unavailable(str(error)) from error
    _state.update(stamp="\n".join(stamp), symbols=symbols, process=process, llvm=llvm)


def _address(name: str) -> int | None:
    """Where the symbol `name` is: one of numba's helpers, else in the process."""
    if name in _state["symbols"]:
        return _state["symbols"][name]
    try:
        return ctypes.cast(getattr(_state["process"], name), ctypes.c_void_p).value
    except AttributeError:
        return None


def _extension(name: str, stem: Path):
    """numba's extension module `name` at `stem` + this Python's suffix, as imported, or loaded on its
    own (its package is not imported)."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = stem.with_name(stem.name + suffix)
        if path.exists():
            break
    else:
        raise Unavailable(f"no {stem.name} extension module")
    if name in sys.modules:
        return sys.modules[name], path
    loader = importlib.machinery.ExtensionFileLoader(name, str(path))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(name, loader))
    loader.exec_module(module)
    return module, path


def digest(source: str, types: tuple[str, ...], result: str | None) -> str:
    """The name of the loop's object: its source and signature, on this machine and numba."""
    _setup()
    text = "\n".join([_state["stamp"], ",".join(types), str(result), source])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _folders() -> list[Path]:
    return cache_folders("loops")


def _read(name: str) -> tuple[dict, bytes] | None:
    """The header and object code stored under `name`, or None (absent, unreadable or changed)."""
    for folder in _folders():
        try:
            data = (folder / f"{name}.o").read_bytes()
        except OSError:
            continue
        head, _, code = data.partition(b"\n")
        try:
            header = json.loads(head)
        except ValueError:
            continue
        if isinstance(header, dict) and header.get("sha256") == hashlib.sha256(code).hexdigest():
            return header, code
    return None


def _write(name: str, header: dict, code: bytes) -> None:
    """Store the object (atomically: a reader sees all of it or none); where no folder can be
    written, nothing is kept and the next run compiles again."""
    data = json.dumps({**header, "sha256": hashlib.sha256(code).hexdigest()}).encode() + b"\n" + code
    try:
        write_into(_folders(), f"{name}.o", data)
    except OSError:
        log.debug("no folder for the compiled loops could be written")


def _link(header: dict, code: bytes) -> int:
    """Link one object into memory; the address of its entry. Unavailable where a symbol it needs
    is not defined here (the linker would leave its calls to address 0)."""
    llvm = _setup()
    found = {name: _address(name) for name in header["needs"]}
    missing = [name for name, address in found.items() if not address]
    if missing:
        raise Unavailable(f"symbols not found: {', '.join(missing[:5])}")
    with _lock:
        for name, address in found.items():
            llvm.add_symbol(name, address)
        machine = llvm.Target.from_default_triple().create_target_machine()
        engine = llvm.create_mcjit_compiler(llvm.parse_assembly(""), machine)  # one per object: no clashes
        engine.add_object_file(llvm.ObjectFileRef.from_data(code))
        engine.finalize_object()
        _engines.append(engine)
        address = engine.get_function_address(header["symbol"])
    if not address:
        raise Unavailable(f"no symbol {header['symbol']} in the object")
    return address


def entry(source: str, types: tuple[str, ...], result: str | None, dispatcher):
    """The loop `source` names, with this C signature: linked from its stored object, else compiled
    from `dispatcher()` (a numba function, imported and compiled only then) and stored; where no
    object can be linked, the dispatcher itself."""
    try:
        name = digest(source, types, result)
        stored = _read(name)
        if stored is not None:
            try:
                return Entry(_link(*stored), types, result)
            except Unavailable as why:
                log.debug("a stored loop cannot be linked (%s): compiling it again", why)
        from .entry_build import compile_entry

        header, code = compile_entry(dispatcher(), types, result, f"entry_{name}")
        address = _link(header, code)
        _write(name, header, code)
        return Entry(address, types, result)
    except Unavailable as why:
        log.debug("loop runs as numba's dispatcher: %s", why)
    from .entry_build import numba_signature

    function = dispatcher()
    function.compile(numba_signature(types))  # or loads it from numba's cache
    return Dispatched(function, types)
