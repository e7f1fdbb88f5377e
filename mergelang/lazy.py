"""torch, imported on first use, so that checking a spec does not wait for it.

Importing torch takes 1-1.5 s of one core, where parsing, lowering and checking a spec against
its inputs' headers take a tenth of that. The modules that every command loads (the op registry
and its kernels, the checkpoint reader, the statistics behind check's warnings) name torch through
`torch` here: the first read of one of its attributes imports it, and each attribute read is then
kept on this object, so a kernel's later `torch.where` costs what it costs on the module itself.
`mergelang check` and `explain` never import it (tests/test_lazy.py); nor does a merge whose regions
all run as native loops over numpy arrays (arrays.py): the executor's modules name torch here too,
and a merge imports it at the first op that needs it (an eager kernel, a compiled region, a GPU).
`when_imported` and `torch_threads` set torch up for a merge without importing it.

Module-level code in those modules must not read torch's attributes (a dtype table, a default
argument): build such values on first use instead. A test that replaces one of torch's functions
for such a module replaces it on this object (`monkeypatch.setattr(module.torch, ...)`).
"""

from __future__ import annotations

import gc
import importlib
import sys
import threading
import types
from contextlib import contextmanager
from typing import Callable

_lock = threading.RLock()
_pending: list[Callable] = []  # hooks to call with torch once it is imported
_quiet = False  # import with the cyclic collector off, then freeze what the import made (launch.py)


class LazyModule(types.ModuleType):
    """Stands for the module of its name until an attribute is read; then imports it."""

    def __getattr__(self, name: str):
        # Called only for an attribute not yet kept here.
        value = getattr(_load(self.__name__), name)
        setattr(self, name, value)
        return value


def _load(name: str):
    with _lock:
        module = sys.modules.get(name)
        if module is None:
            module = _import(name)
        if name == "torch":
            while _pending:
                _pending.pop(0)(module)
        return module


def _import(name: str):
    if not _quiet or not gc.isenabled():
        return importlib.import_module(name)
    # Importing torch makes about 300,000 objects: the collector would walk them again and again,
    # during the import and during the merge that follows (launch.py freezes what its imports make).
    gc.disable()
    try:
        return importlib.import_module(name)
    finally:
        gc.freeze()
        gc.enable()


def import_quietly() -> None:
    """From now on, a module imported here is imported with the cyclic collector off, and then
    frozen (out of the collector's way): for a command line that merges (launch.py)."""
    global _quiet
    _quiet = True


def when_imported(hook: Callable) -> Callable:
    """Call hook(torch) once torch is imported: now where it is (and nothing is pending), else at the
    first read of one of `torch`'s attributes after that. Returns the hook, for `cancel`."""
    with _lock:
        if "torch" in sys.modules and not _pending:
            hook(sys.modules["torch"])
        else:
            _pending.append(hook)
    return hook


def cancel(hook: Callable) -> None:
    with _lock:
        if hook in _pending:
            _pending.remove(hook)


@contextmanager
def torch_threads(n: int):
    """Within: torch's CPU kernels use n threads (set now where torch is imported, else when it is:
    a merge whose loops need no torch does not import it for this); the number before, after."""
    before: list[int] = []

    def apply(module) -> None:
        before.append(module.get_num_threads())
        module.set_num_threads(n)

    hook = when_imported(apply)
    try:
        yield
    finally:
        cancel(hook)
        if before:
            sys.modules["torch"].set_num_threads(before[0])


torch = LazyModule("torch")
