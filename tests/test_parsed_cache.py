"""parse.parse_files: the stdlib's parsed programs kept between runs."""

from __future__ import annotations

import pytest

from mergelang import parse
from mergelang.resources import stdlib_files


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A cache folder of the test's own (without the fallback in the temporary folder, which other
    runs share)."""
    folder = tmp_path / "cache" / "parsed"
    monkeypatch.setattr(parse, "cache_folders", lambda name: [folder])
    return folder


def test_cached_programs_equal_freshly_parsed_ones_and_are_used(cache, monkeypatch):
    paths = stdlib_files()
    expected = [parse.parse_file(p) for p in paths]
    assert parse.parse_files(paths) == expected  # parsed, then stored
    assert len(list(cache.glob("programs-*.pickle"))) == 1

    def fail(path):
        raise AssertionError(f"{path} parsed again")

    monkeypatch.setattr(parse, "parse_file", fail)
    assert parse.parse_files(paths) == expected  # from the cache


def test_a_changed_file_is_parsed_again(cache, tmp_path):
    spec = tmp_path / "a.ml"
    spec.write_text("def f(x) = x * 2\n")
    first = parse.parse_files([spec])
    spec.write_text("def f(x) = x * 3\n")
    second = parse.parse_files([spec])
    assert second == [parse.parse_file(spec)] and second != first
    assert len(list(cache.glob("programs-*.pickle"))) == 2


@pytest.mark.parametrize("damage", [b"", b"not a pickle", b"\x80\x05N."])  # empty, garbage, None
def test_a_damaged_entry_is_parsed_again_and_rewritten(cache, tmp_path, damage):
    spec = tmp_path / "a.ml"
    spec.write_text("def f(x) = x * 2\n")
    expected = parse.parse_files([spec])
    [entry] = cache.glob("programs-*.pickle")
    entry.write_bytes(damage)
    assert parse.parse_files([spec]) == expected
    assert entry.read_bytes() != damage
