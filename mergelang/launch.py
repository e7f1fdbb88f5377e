"""The console script's entry point (`mergelang`, `python -m mergelang`): the command line, run
inside one frame that reserves room on the interpreter's frame stack.

CPython (3.11 and later) keeps each thread's Python frames in chunks of 16 KB, mapped when a call
does not fit the current chunk and unmapped as soon as that call returns. A call sitting on a
chunk's edge maps and unmaps a chunk every time it runs, and importing torch and mergelang's modules
makes thousands of such calls: `import mergelang.cli` mapped and unmapped 10,000-14,000 chunks,
0.1-0.15 s of its 1.4 s here, where the first touch of fresh memory is slow. Where the imports start
decides how many: moved a few calls deeper, it was 800. Called from `_roomy`, whose frame reserves
64 KB of stack slots, everything runs in one chunk of 128 KB taken once: 2 chunks mapped in all.

For the commands that merge, malloc is told first to keep freed memory (memory.tune_malloc: before
any other thread starts, so that all share one arena), then a thread touches the heap the merge
will use and reads ahead the files loaded after mergelang's modules (prefetch.py), while this one
imports them. `run` imports torch only where an op of the merge needs it (arrays.py): a merge whose
regions all run as native loops never does; `demo`, `verify` and `stats` import it first. The other
commands (check, explain, ...) do not import torch at all (lazy.py).
"""

from __future__ import annotations

import gc
import os
import sys

from . import lazy, memory, prefetch

ROOM_SLOTS = 1 << 13  # stack slots of 8 bytes: a frame of 64 KB, so a chunk of 128 KB half free


def _roomy(command):
    return command()


_roomy.__code__ = _roomy.__code__.replace(co_stacksize=ROOM_SLOTS)


MERGES = ("run", "demo")  # the commands that merge
# The commands that import torch before they start: the others import it where they need it (lazy.py),
# and `run` only for an op that no native loop computes (arrays.py).
TORCH_FIRST = ("demo", "verify", "stats")


def entry() -> None:
    # Importing torch makes about 300,000 objects, and the cyclic collector walks all of them again
    # and again, during the import and then during the merge (7% of a `linear` run's CPU samples).
    # Collection is off while the modules load; what they made is then frozen, out of its way.
    gc.disable()
    # numpy and scipy (which numba imports) start OpenBLAS thread pools that mergelang never uses
    # (torch computes with its own libraries); idle, their threads spin on the CPUs the merge needs.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    name = sys.argv[1] if len(sys.argv) > 1 else None
    if name in MERGES:
        memory.tune_malloc()
        prefetch.start(warm_bytes=memory.warm_bytes())

    def command() -> None:
        if name in TORCH_FIRST:  # torch is imported here, before the collector is back on
            import torch  # noqa: F401
        from .cli import entry as cli_entry

        gc.freeze()
        gc.enable()
        lazy.import_quietly()  # torch imported later is kept out of the collector's way too
        cli_entry()

    _roomy(command)
