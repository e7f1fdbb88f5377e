"""Commands that only read a spec and its inputs' headers (check, explain, import) never import
torch (mergelang/lazy.py); reading it costs them 1-1.5 s here, where their own work is a tenth."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import write_spec
from mergelang.demo import make_tiny_llama
from mergelang.io import Checkpoint
from mergelang.lazy import LazyModule

# Runs the command line with torch made unimportable: importing it fails the command.
_WITHOUT_TORCH = """
import runpy, sys

class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "torch":
            raise ImportError("torch was imported")

sys.meta_path.insert(0, NoTorch())
sys.argv = ["mergelang", *sys.argv[1:]]
runpy.run_module("mergelang", run_name="__main__")
"""


def _without_torch(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _WITHOUT_TORCH, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """bf16 tiny Llamas: base/, small/ (δ ~ N(0, 0.005)) and large/ (δ ~ N(0, 0.03), which draws
    check's warning about DARE, from a sample of the deltas)."""
    root = tmp_path_factory.mktemp("lazy")
    make_tiny_llama(root / "base", seed=0)
    make_tiny_llama(root / "small", seed=1, base=root / "base")
    make_tiny_llama(root / "large", seed=2, base=root / "base", delta_std=0.03)
    return root


def test_check_reads_headers_and_samples_deltas_without_torch(models):
    spec = write_spec(models, 'base = model("base")\nsmall = model("small")\nlarge = model("large")\n'
                              "output ties(base, [small, dare(large - base, p=0.9) + base], weights=[0.5, 0.5], "
                              "density=0.5)\n")
    done = _without_torch("check", str(spec), cwd=models)
    assert done.returncode == 0, done.stderr
    with Checkpoint.open(models / "base") as base:
        assert done.stdout.startswith(f"ok: {len(base.tensors)} output tensors")
    # the sample of large − base was read (without torch) and judged large
    assert "whose deltas are large" in done.stderr


def test_check_without_torch_reports_errors(models):
    spec = write_spec(models, 'base = model("base")\noutput base + dare(base, p=1.5)\n', name="bad.ml")
    done = _without_torch("check", str(spec), cwd=models)
    assert done.returncode == 1
    assert "error[E006]: `p` of `dare` must be in [0, 1), got 1.5" in done.stderr and "bad.ml:2:28" in done.stderr


@pytest.mark.parametrize("args", [
    ("explain", "{spec}"),
    ("explain", "{spec}", "--tensor", "model.layers.1.mlp.up_proj.weight"),
])
def test_explain_without_torch(models, args):
    spec = write_spec(models, 'base = model("base")\nsmall = model("small")\noutput slerp(base, small, t=0.3)\n',
                      name="slerp.ml")
    done = _without_torch(*(a.format(spec=spec) for a in args), cwd=models)
    assert done.returncode == 0, done.stderr
    assert "slerp" in done.stdout and "output = %" in done.stdout


def test_import_without_torch(models):
    config = models / "ties.yml"
    config.write_text("merge_method: ties\nbase_model: base\nmodels:\n  - model: small\n"
                      "    parameters: {weight: 1.0, density: 0.5}\n")
    done = _without_torch("import", str(config), cwd=models)
    assert done.returncode == 0, done.stderr
    assert "ties(base, [small]" in done.stdout


def test_lazy_module_imports_on_first_read_and_keeps_what_it_read():
    lazy = LazyModule("torch")
    assert "float32" not in vars(lazy)
    assert lazy.float32 is torch.float32 and lazy.where is torch.where
    assert vars(lazy)["float32"] is torch.float32  # kept: later reads are plain attribute reads
    with pytest.raises(AttributeError):
        lazy.no_such_attribute
