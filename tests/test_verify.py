"""`mergelang verify`: identical folders pass; changed inputs, changed outputs, missing records and
moved inputs are reported by model, file and tensor."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from mergelang import __version__
from mergelang.cli import main
from mergelang.demo import make_tiny_llama
from mergelang.io import read_header

SPEC = """\
base = model("base")
ft0 = model("ft0")
output base + dare(ft0 - base, p=0.5)
"""


def invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def make_merge(folder: Path) -> Path:
    make_tiny_llama(folder / "base", seed=0)
    make_tiny_llama(folder / "ft0", seed=1, base=folder / "base")
    (folder / "spec.ml").write_text(SPEC)
    result = invoke("run", folder / "spec.ml", "-o", folder / "out", "--seed", "4", "-q")
    assert result.exit_code == 0, result.output
    return folder / "out"


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Path:
    return make_merge(tmp_path_factory.mktemp("verify"))


@pytest.fixture
def merged(shared, tmp_path) -> Path:
    """A copy of the merged folder, to change; its record names the shared inputs."""
    return Path(shutil.copytree(shared, tmp_path / "out"))


@pytest.fixture
def own(tmp_path) -> Path:
    """A merge with inputs of its own, to change."""
    return make_merge(tmp_path)


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x01]))


def test_identical(merged):
    result = invoke("verify", merged, "-q")
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1] == "identical"
    assert [p.name for p in merged.parent.iterdir()] == ["out"]  # nothing left beside the folder


def test_changed_input_is_reported_by_model_and_file(own, tmp_path):
    merged = own
    weights = tmp_path / "ft0" / "model.safetensors"
    info = read_header(weights)[0]["model.norm.weight"]
    flip(weights, info.start)
    result = invoke("verify", merged, "-q")
    assert result.exit_code == 1
    assert "error[E034]: model `ft0`: file model.safetensors changed since the merge: its sha256 was" in result.output
    assert "`base`" not in result.output


def test_changed_output_tensor_is_named(merged, tmp_path):
    weights = merged / "model.safetensors"
    name = "model.layers.1.mlp.up_proj.weight"
    info = read_header(weights)[0][name]
    element = 37
    flip(weights, info.start + element * 2 + 1)  # bf16: the high byte of element 37
    work = tmp_path / "work"
    result = invoke("verify", merged, "-q", "--tmp", work)
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == \
        f"differs: model.safetensors: tensor `{name}` differs, first at element {element} (flattened)"
    assert list(work.iterdir()) == []  # the re-run merge is removed


def test_changed_config_is_the_first_differing_file(merged):
    (merged / "config.json").write_text((merged / "config.json").read_text().replace("silu", "gelu"))
    result = invoke("verify", merged, "-q")
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == "differs: config.json differs"


def test_missing_record_is_a_clear_error(merged):
    (merged / "README.md").unlink()
    result = invoke("verify", merged, "-q")
    assert result.exit_code == 1
    assert f"error[E033]: {merged} has no README.md, so no record of how it was made" in result.output


def test_moved_input_needs_model_option_and_hashes_must_match(own, tmp_path):
    merged = own
    shutil.move(tmp_path / "ft0", tmp_path / "moved")
    result = invoke("verify", merged, "-q")
    assert result.exit_code == 1
    assert "model `ft0`: file model.safetensors is missing from" in result.output
    assert "pass --model ft0=NEW_FOLDER" in result.output
    result = invoke("verify", merged, "-q", "--model", f"ft0={tmp_path / 'moved'}")
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1] == "identical"
    # Another model in its place is not the recorded input.
    make_tiny_llama(tmp_path / "other", seed=9, base=tmp_path / "base")
    result = invoke("verify", merged, "-q", "--model", f"ft0={tmp_path / 'other'}")
    assert result.exit_code == 1
    assert "model `ft0`: file model.safetensors changed since the merge" in result.output


def test_other_version_warns_and_prose_edits_are_allowed(merged):
    card = merged / "README.md"
    text = card.read_text()
    assert f'"mergelang": "{__version__}"' in text and "\n# spec\n" in text
    card.write_text(text.replace(f'"mergelang": "{__version__}"', '"mergelang": "0.0.1"')
                    .replace("\n# spec\n", "\n# My merged model\n\nSome words of my own.\n"))
    assert "Some words of my own." in card.read_text()
    result = invoke("verify", merged, "-q")
    assert result.exit_code == 0, result.output
    assert f"warning[E033]: the folder was made by mergelang 0.0.1, this is {__version__}" in result.output
    assert "a different version may compute different bits" in result.output


def test_changed_record_field_is_reported(merged):
    card = merged / "README.md"
    card.write_text(card.read_text().replace('"seed": 4', '"seed": 5'))
    result = invoke("verify", merged, "-q")
    assert result.exit_code == 1
    # The re-run follows the record (seed 5), so its weights differ from the ones made with seed 4.
    assert result.output.strip().splitlines()[-1].startswith("differs: model.safetensors: tensor `")
