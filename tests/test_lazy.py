"""Commands that only read a spec and its inputs' headers (check, explain, import) never import
torch (mergelang/lazy.py); reading it costs them 1-1.5 s here, where their own work is a tenth.
Nor does a merge whose regions all run as native loops (arrays.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import write_spec
from mergelang.api import RunOptions, run
from mergelang.demo import TINY_LLAMA, make_tiny_llama
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


def _without_torch(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _WITHOUT_TORCH, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env=None if env is None else {**os.environ, **env})


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


# Tensors of 2^16 entries and more (native.MIN_ELEMENTS) take the loops, the smaller ones (the
# norms, k_proj and v_proj) the loops that those built.
LOOP_SIZED = dict(TINY_LLAMA, vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=64)


@pytest.fixture(scope="module")
def loop_sized(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("loop-sized")
    make_tiny_llama(root / "base", seed=0, config=LOOP_SIZED)
    for i in range(3):
        make_tiny_llama(root / f"ft{i}", seed=i + 1, base=root / "base")
    return root


@pytest.mark.parametrize("method", [
    "linear([ft0, ft1, ft2], weights=[0.5, 0.3, 0.2])",
    "dare_linear(base, [ft0, ft1], weights=[0.5, 0.5], density=0.1)",  # l1 sums of each delta
    "ties(base, [ft0, ft1, ft2], weights=[0.5, 0.3, 0.2], density=0.5)",  # top-k selects
    "breadcrumbs(base, [ft0, ft1], weights=[0.5, 0.5], density=0.5, gamma=0.05)",  # bands
])
def test_a_merge_of_native_regions_runs_without_torch(loop_sized, tmp_path, monkeypatch, method):
    """The benchmark's merges (and breadcrumbs), run with torch unimportable, give the bytes of the
    eager torch path."""
    spec = write_spec(tmp_path, "".join(f'{m} = model("{loop_sized / m}")\n' for m in ("base", "ft0", "ft1", "ft2"))
                      + f"output {method}\n")
    done = _without_torch("run", str(spec), "-o", str(tmp_path / "out"), "-q", cwd=tmp_path,
                          env={"MERGELANG_COMPILE": "auto"})  # the default (the tests' is "never")
    assert done.returncode == 0, done.stderr
    monkeypatch.setenv("MERGELANG_NATIVE", "0")
    eager = run(spec, tmp_path / "eager", RunOptions())
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (eager / "model.safetensors").read_bytes()


def test_lazy_module_imports_on_first_read_and_keeps_what_it_read():
    lazy = LazyModule("torch")
    assert "float32" not in vars(lazy)
    assert lazy.float32 is torch.float32 and lazy.where is torch.where
    assert vars(lazy)["float32"] is torch.float32  # kept: later reads are plain attribute reads
    with pytest.raises(AttributeError):
        lazy.no_such_attribute


def test_torch_is_set_up_for_a_merge_as_it_is_imported():
    """Hooks wait for torch's import (the first read of an attribute of `lazy.torch`); torch_threads
    sets the thread count then, and puts the one before back on leaving; import_quietly imports with
    the collector off and freezes what the import made."""
    code = """
import gc, sys
from mergelang import lazy
seen = []
lazy.when_imported(lambda module: seen.append(module.__name__))
lazy.import_quietly()
frozen = gc.get_freeze_count()
with lazy.torch_threads(1):
    assert "torch" not in sys.modules and not seen
    lazy.torch.zeros(1)
    assert seen == ["torch"] and lazy.torch.get_num_threads() == 1
    assert gc.get_freeze_count() > frozen + 100_000 and gc.isenabled()
assert lazy.torch.get_num_threads() == THREADS
with lazy.torch_threads(1):  # imported already: set at once
    assert lazy.torch.get_num_threads() == 1
assert lazy.torch.get_num_threads() == THREADS
print("ok")
"""
    default = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                             capture_output=True, text=True, timeout=120).stdout.strip()  # torch's own count
    done = subprocess.run([sys.executable, "-c", code.replace("THREADS", default)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout == "ok\n", done.stderr
