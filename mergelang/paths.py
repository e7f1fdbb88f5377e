"""Where mergelang keeps what it caches between runs (a module of its own: it imports nothing heavy)."""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path


def cache_dir() -> Path:
    """MERGELANG_CACHE_DIR, else $XDG_CACHE_HOME/mergelang, else ~/.cache/mergelang."""
    if os.environ.get("MERGELANG_CACHE_DIR"):
        return Path(os.environ["MERGELANG_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mergelang"


def cache_folders(name: str) -> list[Path]:
    """Where mergelang keeps what it generates under `name` ("regions", "loops"): that folder of the
    cache folder, else one in the temporary folder (for a cache folder that cannot be written)."""
    user = os.getuid() if hasattr(os, "getuid") else 0
    return [cache_dir() / name, Path(tempfile.gettempdir()) / f"mergelang-{name}-{user}"]


def write_into(folders: list[Path], filename: str, data: bytes) -> Path:
    """Write `data` as `filename` into the first of `folders` that takes it, through a temporary
    file renamed into place (a reader sees all of it or none); its path. OSError where none does."""
    for folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / f".{filename}.{os.getpid()}.{threading.get_ident()}.tmp"
            tmp.write_bytes(data)
            os.replace(tmp, folder / filename)
            return folder / filename
        except OSError:
            continue
    raise OSError(f"none of {', '.join(map(str, folders))} could be written")
