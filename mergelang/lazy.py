"""torch, imported on first use, so that checking a spec does not wait for it.

Importing torch takes 1-1.5 s of one core, where parsing, lowering and checking a spec against
its inputs' headers take a tenth of that. The modules that every command loads (the op registry
and its kernels, the checkpoint reader, the statistics behind check's warnings) name torch through
`torch` here: the first read of one of its attributes imports it, and each attribute read is then
kept on this object, so a kernel's later `torch.where` costs what it costs on the module itself.
`mergelang check` and `explain` never import it (tests/test_lazy.py); a merge imports it when it
starts to compute (execute.py imports it as usual).

Module-level code in those modules must not read torch's attributes (a dtype table, a default
argument): build such values on first use instead. A test that replaces one of torch's functions
for such a module replaces it on this object (`monkeypatch.setattr(module.torch, ...)`).
"""

from __future__ import annotations

import importlib
import types


class LazyModule(types.ModuleType):
    """Stands for the module of its name until an attribute is read; then imports it."""

    def __getattr__(self, name: str):
        # Called only for an attribute not yet kept here.
        value = getattr(importlib.import_module(self.__name__), name)
        setattr(self, name, value)
        return value


torch = LazyModule("torch")
