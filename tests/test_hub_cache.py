"""Hub ids resolved in a local Hugging Face cache built by the test (the real layout: refs, snapshots
of symlinks into blobs); nothing is downloaded."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from conftest import write_spec
from mergelang.api import RunOptions, check, run
from mergelang.cli import main
from mergelang.diagnostics import MergelangError
from mergelang.io.hub import cache_dir, looks_like_hub_id

MAIN = hashlib.sha1(b"first commit").hexdigest()
TAGGED = hashlib.sha1(b"second commit").hexdigest()


def add_snapshot(cache: Path, repo_id: str, commit: str, source: Path, refs: tuple[str, ...] = ()) -> Path:
    """Store `source`'s files as `repo_id` at `commit` the way huggingface_hub does; point `refs` at it."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for file in sorted(source.iterdir()):
        data = file.read_bytes()
        blob = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / blob).write_bytes(data)
        (snapshot / file.name).symlink_to(Path("../../blobs") / blob)
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def cache(family: Path, tmp_path: Path, monkeypatch) -> Path:
    """org/tiny: main → ft0's weights, tag v1.0 → ft1's weights."""
    root = tmp_path / "hf-cache"
    add_snapshot(root, "org/tiny", MAIN, family / "ft0", refs=("main",))
    add_snapshot(root, "org/tiny", TAGGED, family / "ft1", refs=("v1.0",))
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.chdir(tmp_path)
    return root


def snapshot(cache: Path, commit: str) -> Path:
    return cache / "models--org--tiny" / "snapshots" / commit


def planned_path(spec: Path, options: RunOptions | None = None) -> dict[str, Path]:
    plan = check(spec, options or RunOptions())
    try:
        return {key: c.path for key, c in plan.checkpoints.items()}
    finally:
        plan.close()


def diagnostics(spec: Path, options: RunOptions | None = None):
    with pytest.raises(MergelangError) as exc_info:
        check(spec, options or RunOptions())
    return exc_info.value.diagnostics


def test_hub_id_resolves_to_main(cache: Path, tmp_path: Path):
    spec = write_spec(tmp_path, 'm = model("org/tiny")\noutput m * 2\n')
    assert planned_path(spec) == {"m": snapshot(cache, MAIN)}


@pytest.mark.parametrize("revision, commit", [
    ("main", MAIN),
    ("v1.0", TAGGED),
    (TAGGED, TAGGED),
    (MAIN[:8], MAIN),
])
def test_revision(cache: Path, tmp_path: Path, revision: str, commit: str):
    spec = write_spec(tmp_path, f'm = model("org/tiny", revision="{revision}")\noutput m * 2\n')
    assert planned_path(spec) == {"m": snapshot(cache, commit)}


def test_merge_two_revisions(cache: Path, family: Path, tmp_path: Path):
    spec = write_spec(tmp_path, 'a = model("org/tiny")\nb = model("org/tiny", revision="v1.0")\n'
                                "output a + 0.5 * (b - a)\n")
    out = run(spec, tmp_path / "merged", RunOptions(dtype="fp32"))
    merged = load_file(str(out / "model.safetensors"))
    a, b = load_file(str(family / "ft0" / "model.safetensors")), load_file(str(family / "ft1" / "model.safetensors"))
    assert set(merged) == set(a)
    for name in a:
        assert torch.equal(merged[name], a[name].float() + 0.5 * (b[name].float() - a[name].float())), name
    # config.json is copied from the snapshot as a file, not as a link into the cache
    assert not (out / "config.json").is_symlink()
    written, source = (json.loads((f / "config.json").read_text()) for f in (out, family / "ft0"))
    assert written["torch_dtype"] == "float32"
    assert {k: v for k, v in written.items() if "dtype" not in k} == {k: v for k, v in source.items() if "dtype" not in k}


def test_unknown_revision_lists_the_cached_ones(cache: Path, tmp_path: Path):
    spec = write_spec(tmp_path, 'base = model("org/tiny")\nm = model("org/tiny", revision="v2")\noutput m - base\n')
    (d,) = diagnostics(spec)
    assert (d.code, d.span.line, d.span.col) == ("E007", 2, 5)
    assert d.message == "model `m`: the local Hugging Face cache has no revision `v2` of `org/tiny`"
    assert d.notes[0] == f"searched {cache / 'models--org--tiny'}"
    commits = ", ".join(sorted([MAIN, TAGGED]))
    assert d.notes[1] == f"the cache has: main ({MAIN[:7]}), v1.0 ({TAGGED[:7]}), {commits}"
    assert d.help == "download it with `huggingface-cli download org/tiny --revision v2`; or pass --model m=PATH"


def test_missing_hub_id(cache: Path, tmp_path: Path):
    spec = write_spec(tmp_path, 'base = model("org/tiny")\nft = model("org/absent")\noutput ft - base\n')
    result = CliRunner().invoke(main, ["check", str(spec)])
    assert result.exit_code == 1
    expected = [
        "error[E007]: model `ft`: `org/absent` is not in the local Hugging Face cache",
        f"--> {spec}:2:6",
        '2 | ft = model("org/absent")',
        f"= note: searched {cache} for models--org--absent",
        f"= note: there is no folder {tmp_path / 'org' / 'absent'} either",
        "= help: download it with `huggingface-cli download org/absent`; or pass --model ft=PATH",
    ]
    for line in expected:
        assert line in result.output, (line, result.output)
    assert "Traceback" not in result.output


def test_cli_model_option_takes_a_hub_id(cache: Path, tmp_path: Path):
    spec = write_spec(tmp_path, 'ft = model("elsewhere")\noutput ft * 2\n')
    assert planned_path(spec, RunOptions(models={"ft": Path("org/tiny")})) == {"ft": snapshot(cache, MAIN)}
    (d,) = diagnostics(spec, RunOptions(models={"ft": Path("org/gone")}))
    assert d.code == "E007" and d.message == "model `ft`: `org/gone` is not in the local Hugging Face cache"
    assert "`ft` was given by --model ft=org/gone" in d.notes


def test_local_folder_wins_and_takes_no_revision(cache: Path, family: Path, tmp_path: Path):
    local = tmp_path / "org" / "tiny"
    local.parent.mkdir()
    local.symlink_to(family / "base")
    spec = write_spec(tmp_path, 'm = model("org/tiny")\noutput m * 2\n')
    assert planned_path(spec) == {"m": local}
    spec = write_spec(tmp_path, 'm = model("org/tiny", revision="main")\noutput m * 2\n')
    (d,) = diagnostics(spec)
    assert (d.code, d.span.line, d.span.col) == ("E007", 1, 5)
    assert d.message == f"model `m`: `revision=` applies to hub ids, but `org/tiny` is the local folder {local}"


def test_revision_needs_a_hub_id(cache: Path, tmp_path: Path):
    spec = write_spec(tmp_path, 'm = model("./nowhere", revision="main")\noutput m * 2\n')
    (d,) = diagnostics(spec)
    assert d.code == "E007" and d.message == "model `m`: `revision=` needs a hub id `owner/name`, found `./nowhere`"


def test_revision_must_be_a_string(cache: Path, tmp_path: Path):
    spec = write_spec(tmp_path, 'm = model("org/tiny", revision=3)\noutput m * 2\n')
    (d,) = diagnostics(spec)
    assert (d.code, d.span.line, d.span.col) == ("E005", 1, 32)
    assert d.message == "`revision` of `model` must be a string (a branch, tag or commit), found a number"
    spec = write_spec(tmp_path, 'm = model("org/tiny", branch="main")\noutput m * 2\n')
    (d,) = diagnostics(spec)
    assert (d.code, d.message) == ("E004", "`model` takes no keyword `branch`")


def test_cache_folder_from_environment():
    home = str(Path("~").expanduser())
    assert cache_dir({"HF_HUB_CACHE": "/a/hub", "HF_HOME": "/b"}) == Path("/a/hub")
    assert cache_dir({"HF_HOME": "/b", "XDG_CACHE_HOME": "/c"}) == Path("/b/hub")
    assert cache_dir({"XDG_CACHE_HOME": "/c"}) == Path("/c/huggingface/hub")
    assert cache_dir({}) == Path(home) / ".cache" / "huggingface" / "hub"


@pytest.mark.parametrize("text, expected", [
    ("org/name", True), ("meta-llama/Llama-2-7b-hf", True), ("a.b/c_d.e", True),
    ("name", False), ("./org/name", False), ("/abs/name", False), ("a/b/c", False), ("org/..", False),
    ("~/models", False), ("org/", False),
])
def test_what_looks_like_a_hub_id(text: str, expected: bool):
    assert looks_like_hub_id(text) is expected
