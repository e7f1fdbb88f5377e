"""Atomic output folders: complete or absent, never half-written."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from mergelang.io import atomic_output_dir, free_bytes


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under `folder`, relative, with file contents (None for folders)."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def fill(folder: Path, content: str) -> None:
    (folder / "model.safetensors").write_text(content)
    (folder / "sub").mkdir()
    (folder / "sub" / "config.json").write_text("{}")


def test_success_renames_into_place(tmp_path: Path):
    target = tmp_path / "merged"
    with atomic_output_dir(target) as tmp:
        assert tmp.parent == tmp_path
        assert tmp.name.startswith(".merged.mergelang-tmp-")
        assert tmp.is_dir() and not target.exists()
        fill(tmp, "new")
    assert snapshot(tmp_path) == {
        "merged": None,
        "merged/model.safetensors": b"new",
        "merged/sub": None,
        "merged/sub/config.json": b"{}",
    }


@pytest.mark.parametrize("error", [ValueError("boom"), KeyboardInterrupt()])
def test_exception_leaves_nothing(tmp_path: Path, error: BaseException):
    target = tmp_path / "merged"
    with pytest.raises(type(error)):
        with atomic_output_dir(target) as tmp:
            fill(tmp, "partial")
            raise error
    assert snapshot(tmp_path) == {}


def test_existing_target_without_force_is_untouched(tmp_path: Path):
    target = tmp_path / "merged"
    target.mkdir()
    fill(target, "old")
    before = snapshot(tmp_path)
    entered = False
    with pytest.raises(FileExistsError, match=r"merged already exists and is a non-empty folder"):
        with atomic_output_dir(target):
            entered = True
    assert not entered
    assert snapshot(tmp_path) == before


def test_existing_file_without_force(tmp_path: Path):
    target = tmp_path / "merged"
    target.write_text("a file")
    with pytest.raises(FileExistsError, match="already exists and is a file"):
        with atomic_output_dir(target):
            pass
    assert snapshot(tmp_path) == {"merged": b"a file"}


def test_empty_existing_folder_is_reused(tmp_path: Path):
    target = tmp_path / "merged"
    target.mkdir()
    with atomic_output_dir(target) as tmp:
        fill(tmp, "new")
    assert snapshot(tmp_path) == {
        "merged": None,
        "merged/model.safetensors": b"new",
        "merged/sub": None,
        "merged/sub/config.json": b"{}",
    }


def test_force_replaces_existing(tmp_path: Path):
    target = tmp_path / "merged"
    target.mkdir()
    fill(target, "old")
    (target / "stale.txt").write_text("gone after replace")
    with atomic_output_dir(target, force=True) as tmp:
        assert (target / "model.safetensors").read_text() == "old"
        fill(tmp, "new")
    assert snapshot(tmp_path) == {
        "merged": None,
        "merged/model.safetensors": b"new",
        "merged/sub": None,
        "merged/sub/config.json": b"{}",
    }


def test_force_replaces_a_file(tmp_path: Path):
    target = tmp_path / "merged"
    target.write_text("a file")
    with atomic_output_dir(target, force=True) as tmp:
        (tmp / "x").write_text("new")
    assert snapshot(tmp_path) == {"merged": None, "merged/x": b"new"}


def test_force_with_failure_keeps_the_old_output(tmp_path: Path):
    target = tmp_path / "merged"
    target.mkdir()
    fill(target, "old")
    before = snapshot(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        with atomic_output_dir(target, force=True) as tmp:
            fill(tmp, "partial")
            raise KeyboardInterrupt
    assert snapshot(tmp_path) == before


def test_target_appearing_during_the_run_is_not_overwritten(tmp_path: Path):
    target = tmp_path / "merged"
    with pytest.raises(FileExistsError, match="already exists"):
        with atomic_output_dir(target) as tmp:
            fill(tmp, "new")
            target.mkdir()
            (target / "other").write_text("someone else's")
    assert snapshot(tmp_path) == {"merged": None, "merged/other": b"someone else's"}


def test_parent_is_created(tmp_path: Path):
    target = tmp_path / "a" / "b" / "merged"
    with atomic_output_dir(target) as tmp:
        assert tmp.parent == tmp_path / "a" / "b"
        (tmp / "x").write_text("1")
    assert snapshot(tmp_path) == {"a": None, "a/b": None, "a/b/merged": None, "a/b/merged/x": b"1"}


def test_free_bytes_uses_nearest_existing_ancestor(tmp_path: Path):
    expected = shutil.disk_usage(tmp_path).free
    got = free_bytes(tmp_path / "not" / "yet" / "created")
    assert abs(got - expected) < 64 * 2**20
    assert abs(free_bytes(tmp_path) - expected) < 64 * 2**20
