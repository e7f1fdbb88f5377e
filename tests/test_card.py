"""The model card every run writes (README.md): front matter, inputs, the record, and input hashing."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import yaml

from conftest import write_spec
from mergelang import __version__
from mergelang.api import RunOptions, run
from mergelang.io.card import CardError, read_record, render_card, write_card
from mergelang.io.hashing import HashCache, hash_file
from mergelang.paths import cache_dir

SPEC = """\
base = model("base")
ft0 = model("ft0")
output base + dare(ft0 - base, p=0.5)
"""


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_card_front_matter_inputs_and_record(family, tmp_path):
    spec = write_spec(family, SPEC, "card_test.ml")
    out = tmp_path / "out"
    run(spec, out, RunOptions(seed=5, dtype="fp16", shard_size=40_000, models={"ft0": family / "ft1"}))
    text = (out / "README.md").read_text()
    assert front_matter(text) == {"base_model": ["base", "ft0"], "library_name": "transformers",
                                  "tags": ["merge", "mergelang"]}
    assert "```mergelang\n" + SPEC + "```\n" in text
    assert "mergelang verify ." in text
    record = read_record(out)
    files = lambda folder: [{"name": n, "size": (folder / n).stat().st_size, "sha256": sha(folder / n)}  # noqa: E731
                            for n in ("model.safetensors", "config.json", "generation_config.json")]
    assert record == {
        "format": 1,
        "mergelang": __version__,
        "spec": {"name": "card_test.ml", "folder": str(family.resolve()), "text": SPEC},
        "inputs": [
            {"key": "base", "path": "base", "resolved": str((family / "base").resolve()),
             "files": files(family / "base")},
            {"key": "ft0", "path": "ft0", "resolved": str((family / "ft1").resolve()),
             "files": files(family / "ft1")},
        ],
        "seed": 5,
        "options": {"dtype": "F16", "shard_size": 40_000, "models": {"ft0": str((family / "ft1").resolve())}},
    }
    # The inputs table lists every hashed file.
    for entry in record["inputs"]:
        for f in entry["files"]:
            assert f"| `{f['name']}` | {f['size']} | `{f['sha256']}` |" in text


def record_of(**changes) -> dict:
    record = {"format": 1, "mergelang": "0.1.0", "spec": {"name": "s.ml", "folder": "/m", "text": "output x\n"},
              "inputs": [{"key": "a", "path": "org/a b|c", "resolved": "/m/a",
                          "files": [{"name": "model.safetensors", "size": 3, "sha256": "ab" * 32}]}],
              "seed": 0, "options": {"dtype": None, "shard_size": 10, "models": {}}}
    record.update(changes)
    return record


def test_write_then_read_round_trips_odd_text(tmp_path):
    # Backticks in the spec would close a ``` fence: the fences grow to stay closed.
    record = record_of(spec={"name": "s.ml", "folder": "/m", "text": 'a = model("a")\n# ```` odd\noutput a\n'})
    write_card(record, tmp_path / "README.md")
    assert read_record(tmp_path) == record
    assert front_matter((tmp_path / "README.md").read_text())["base_model"] == ["org/a b|c"]
    assert render_card(record) == (tmp_path / "README.md").read_text()


def test_missing_or_malformed_record_is_a_clear_error(tmp_path):
    with pytest.raises(CardError, match="has no README.md"):
        read_record(tmp_path)
    (tmp_path / "README.md").write_text("# my model\n\nsome text\n")
    with pytest.raises(CardError, match="holds no mergelang record"):
        read_record(tmp_path)
    (tmp_path / "README.md").write_text("```json mergelang-record\n{\"format\": 1,\n```\n")
    with pytest.raises(CardError, match=r"line 2\) is not valid JSON"):
        read_record(tmp_path)
    (tmp_path / "README.md").write_text("```json mergelang-record\n{}\n")
    with pytest.raises(CardError, match="opened on line 1 is never closed"):
        read_record(tmp_path)
    bad = record_of()
    bad["inputs"][0]["files"][0]["size"] = "3"
    (tmp_path / "README.md").write_text("```json mergelang-record\n" + json.dumps(bad) + "\n```\n")
    with pytest.raises(CardError, match=r"`inputs\[0\].files\[0\].size` in the mergelang record must be int, found str"):
        read_record(tmp_path)
    del bad["seed"]
    (tmp_path / "README.md").write_text("```json mergelang-record\n" + json.dumps(bad) + "\n```\n")
    with pytest.raises(CardError, match="the mergelang record has no `seed`"):
        read_record(tmp_path)
    (tmp_path / "README.md").write_text("```json mergelang-record\n" + json.dumps(record_of(format=2)) + "\n```\n")
    with pytest.raises(CardError, match="format 2, this mergelang reads format 1 at most"):
        read_record(tmp_path)


def test_hash_cache_is_keyed_by_file_identity(tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(b"abc" * 1000)
    cache = HashCache(tmp_path / "cache")
    assert hash_file(f, cache).sha256 == sha(f)
    cache.save()
    # A fresh cache object reads the saved entry: a planted value proves it is used without reading the file.
    again = HashCache(tmp_path / "cache")
    assert again.get(os.stat(f)) == sha(f)
    again.put(os.stat(f), "0" * 64)
    assert hash_file(f, again).sha256 == "0" * 64
    assert hash_file(f, again, fresh=True).sha256 == sha(f)
    # Rewriting the file changes its mtime (and here its size): the cache no longer applies.
    f.write_bytes(b"abcd" * 1000)
    assert hash_file(f, again).sha256 == sha(f)


def test_cache_folder_from_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("MERGELANG_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "mergelang"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "mergelang"
    monkeypatch.setenv("MERGELANG_CACHE_DIR", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"


def test_hub_blob_name_is_taken_as_its_sha256(tmp_path):
    # A hub cache: snapshots/<rev>/<file> links to blobs/<sha256>; the name is trusted, the file not read.
    name = "1f" * 32
    (tmp_path / "blobs").mkdir()
    (tmp_path / "blobs" / name).write_bytes(b"not really")
    snap = tmp_path / "snapshots" / "abc"
    snap.mkdir(parents=True)
    (snap / "model.safetensors").symlink_to(Path("../../blobs") / name)
    assert hash_file(snap / "model.safetensors", None).sha256 == name
    assert hash_file(snap / "model.safetensors", None, fresh=True).sha256 == sha(tmp_path / "blobs" / name)


def test_cache_that_cannot_be_written_does_not_fail_a_merge(family, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("MERGELANG_CACHE_DIR", str(blocker / "cache"))  # under a file: mkdir fails
    spec = write_spec(family, SPEC, "card_test.ml")
    run(spec, tmp_path / "out", RunOptions(seed=1))
    record = read_record(tmp_path / "out")
    assert record["inputs"][0]["files"][0]["sha256"] == sha(family / "base" / "model.safetensors")


def test_hub_input_card_names_the_hub_id_and_takes_blob_names(family, tmp_path, monkeypatch):
    """A model in a hub cache: the card names it by hub id and takes each blob's name as its sha256
    (a blob deliberately misnamed here shows the name is used unread); verify reads the bytes."""
    from click.testing import CliRunner

    from mergelang.cli import main

    commit = "c0" * 20
    repo = tmp_path / "hf" / "models--org--tiny"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir()
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    names = {}
    for f in sorted((family / "ft0").iterdir()):
        names[f.name] = "ee" * 32 if f.name == "model.safetensors" else sha(f)
        (repo / "blobs" / names[f.name]).write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(Path("../../blobs") / names[f.name])
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    spec = write_spec(tmp_path, 'base = model("base")\ntiny = model("org/tiny")\noutput avg(base, tiny)\n')
    (tmp_path / "base").symlink_to(family / "base")
    run(spec, tmp_path / "out", RunOptions())
    text = (tmp_path / "out" / "README.md").read_text()
    assert front_matter(text)["base_model"] == ["base", "org/tiny"]
    entry = read_record(tmp_path / "out")["inputs"][1]
    assert (entry["key"], entry["path"], entry["resolved"]) == ("tiny", "org/tiny", str(snap.resolve()))
    assert {f["name"]: f["sha256"] for f in entry["files"]} == names
    result = CliRunner().invoke(main, ["verify", str(tmp_path / "out"), "-q"])
    assert result.exit_code == 1
    assert (f"model `tiny`: file model.safetensors changed since the merge: its sha256 was {'ee' * 32}, "
            f"it is {sha(family / 'ft0' / 'model.safetensors')}") in result.output


def test_input_files_cover_what_changes_the_output(tmp_path):
    from mergelang.record import input_files

    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "notes.txt",
                 "pytorch_model-00001-of-00002.bin", "pytorch_model.bin.index.json"):
        (tmp_path / name).write_text("x")
    weights = [tmp_path / "adapter_model.safetensors", tmp_path / "pytorch_model-00001-of-00002.bin"]
    assert [p.name for p in input_files(tmp_path, weights)] == [
        "adapter_model.safetensors", "pytorch_model-00001-of-00002.bin", "pytorch_model.bin.index.json",
        "adapter_config.json", "tokenizer.json"]
