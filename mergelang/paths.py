"""Where mergelang keeps what it caches between runs (a module of its own: it imports nothing heavy)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """MERGELANG_CACHE_DIR, else $XDG_CACHE_HOME/mergelang, else ~/.cache/mergelang."""
    if os.environ.get("MERGELANG_CACHE_DIR"):
        return Path(os.environ["MERGELANG_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mergelang"
