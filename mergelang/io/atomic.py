"""Atomic creation of an output folder: build beside the target, rename into place when complete."""

from __future__ import annotations

import os
import secrets
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _is_real_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def _is_empty_dir(path: Path) -> bool:
    return _is_real_dir(path) and next(path.iterdir(), None) is None


def _occupied(path: Path) -> bool:
    return os.path.lexists(path) and not _is_empty_dir(path)


def _exists_message(target: Path) -> str:
    what = "a non-empty folder" if _is_real_dir(target) else "a file"
    return f"output {target} already exists and is {what}; choose another output folder or force replacing it"


def _make_unique_dir(parent: Path, prefix: str, made: list[Path]) -> Path:
    """Create a new folder; its path is in `made` from just before it exists, so that an interrupt
    arriving at any point after the mkdir still finds it to remove."""
    while True:
        candidate = parent / f"{prefix}{secrets.token_hex(4)}"
        made.append(candidate)
        try:
            candidate.mkdir()
        except FileExistsError:
            made.pop()  # someone else's folder: never ours to remove
            continue
        return candidate


def _unused_name(parent: Path, prefix: str) -> Path:
    while True:
        candidate = parent / f"{prefix}{secrets.token_hex(4)}"
        if not os.path.lexists(candidate):
            return candidate


def _remove(path: Path) -> None:
    if _is_real_dir(path):
        shutil.rmtree(path)
    else:
        path.unlink()


def _commit(tmp: Path, target: Path, force: bool) -> None:
    if not os.path.lexists(target):
        os.rename(tmp, target)
        return
    if _is_empty_dir(target):
        try:
            os.rename(tmp, target)
        except OSError:
            target.rmdir()
            os.rename(tmp, target)
        return
    if not force:
        raise FileExistsError(_exists_message(target))
    old = _unused_name(target.parent, f".{target.name}.mergelang-old-")
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)
        raise
    try:
        _remove(old)
    except OSError as exc:
        warnings.warn(f"replaced {target}, but could not delete the previous copy at {old}: {exc}", stacklevel=3)


@contextmanager
def atomic_output_dir(target: Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `target`; rename it to `target` on success, delete it on failure.

    Raises FileExistsError up front when `target` is a file or a non-empty folder, unless `force`.
    """
    target = Path(target)
    if _occupied(target) and not force:
        raise FileExistsError(_exists_message(target))
    target.parent.mkdir(parents=True, exist_ok=True)
    made: list[Path] = []
    try:
        tmp = _make_unique_dir(target.parent, f".{target.name}.mergelang-tmp-", made)
        yield tmp
        _commit(tmp, target, force)
    except BaseException:
        for path in made:
            shutil.rmtree(path, ignore_errors=True)
        raise


def free_bytes(folder: Path) -> int:
    """Free space, in bytes, on the file system that holds `folder` (or its nearest existing ancestor)."""
    path = Path(folder).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free
