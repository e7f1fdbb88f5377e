"""Shared fixtures: tiny checkpoint families made on the fly (nothing is downloaded)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from mergelang.demo import make_tiny_llama

# Compiling regions takes seconds per region: the suite runs eagerly, tests/test_fusion.py compiles.
os.environ.setdefault("MERGELANG_COMPILE", "never")


def digests(folder: Path) -> dict[str, str]:
    """sha256 of every file directly in folder, by name: two outputs compared byte for byte."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def write_spec(folder: Path, text: str, name: str = "spec.ml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


@pytest.fixture(scope="session")
def family(tmp_path_factory) -> Path:
    """A folder with base/, ft0/, ft1/ (tiny bf16 Llamas; the fine-tunes are base + N(0, 0.005))."""
    root = tmp_path_factory.mktemp("family")
    make_tiny_llama(root / "base", seed=0)
    make_tiny_llama(root / "ft0", seed=1, base=root / "base")
    make_tiny_llama(root / "ft1", seed=2, base=root / "base")
    return root


@pytest.fixture(autouse=True)
def _hash_cache(tmp_path_factory, monkeypatch):
    """Runs cache their inputs' sha256 in a folder of the test session, not in the user's ~/.cache."""
    monkeypatch.setenv("MERGELANG_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "hash-cache"))
