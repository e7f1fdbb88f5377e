"""Run mergekit (the reference implementation) and mergelang on the same tiny checkpoints.

mergekit is a test-only dependency; tests that need it call `require_mergekit()`. Both tools
compute in float32 (mergekit with `dtype: float32`; mergelang always does) and write bfloat16, the
inputs' dtype (mergekit's `out_dtype`; mergelang's default). Deterministic methods must agree
within one bfloat16 ulp: the float32 results may round differently where the two tools order
their float operations differently, but never by more than that.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from mergelang.cli import main
from mergelang.demo import make_tiny_llama


def require_mergekit():
    return pytest.importorskip("mergekit.merge", reason="mergekit (a test-only reference) is not installed")


def load_folder(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(folder / f))
    return out


def make_family(root: Path, n_finetunes: int = 3, *, delta_std: float = 0.005, config: dict | None = None) -> Path:
    """root/base and root/ft0..ftN-1: tiny bf16 Llamas, fine-tunes = base + N(0, delta_std)."""
    make_tiny_llama(root / "base", seed=0, config=config)
    for i in range(n_finetunes):
        make_tiny_llama(root / f"ft{i}", seed=i + 1, base=root / "base", delta_std=delta_std)
    return root


def run_mergekit(config: dict, out: Path, *, seed: int | None = None) -> dict[str, torch.Tensor]:
    """Merge with mergekit's Python API (in process: no per-test interpreter start-up)."""
    require_mergekit()
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    config = {"dtype": "float32", "out_dtype": "bfloat16", **config}
    options = MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, random_seed=seed,
                           allow_crimes=True)
    run_merge(MergeConfiguration.model_validate(config), str(out), options=options)
    return load_folder(out)


def run_mergelang(spec: str, folder: Path, out: Path, *, seed: int = 0, extra: tuple[str, ...] = ()) -> dict:
    """Write spec into folder (so model paths resolve there), merge, return the tensors."""
    path = folder / f"{out.name}.ml"
    path.write_text(spec)
    result = CliRunner().invoke(main, ["run", str(path), "-o", str(out), "--seed", str(seed), "-q", "--force",
                                       *extra], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return load_folder(out)


_BITS = {torch.bfloat16: (torch.int16, 0x7FFF), torch.float16: (torch.int16, 0x7FFF),
         torch.float32: (torch.int32, 0x7FFFFFFF)}


def run_tensors(spec: str, models: dict[str, dict[str, torch.Tensor]], folder: Path, *, seed: int = 0,
                dtype: str = "fp32") -> dict[str, torch.Tensor]:
    """Merge hand-made tensors: each model is written as folder/NAME/model.safetensors, the spec's
    `model("NAME")` paths resolve there, and the output is computed and written in `dtype`."""
    from safetensors.torch import save_file

    for name, tensors in models.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / name / "model.safetensors"),
                  metadata={"format": "pt"})
    return run_mergelang(spec, folder, folder / "out", seed=seed, extra=("--dtype", dtype))


def ulp_diff(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in units in the last place of their (common) dtype: the distance between the float
    bit patterns mapped to a monotone integer line, so +0 and -0 are 0 apart."""
    assert a.dtype == b.dtype, (a.dtype, b.dtype)
    int_type, magnitude = _BITS[a.dtype]

    def ordered(x):
        i = x.contiguous().view(int_type).to(torch.int64)
        return torch.where(i < 0, -(i & magnitude), i)

    return (ordered(a) - ordered(b)).abs()


def assert_close_to_terms(ours: dict, theirs: dict, terms: dict, *, max_ulp: int = 2):
    """Sums of the same terms added in another order (a matrix product's, which the BLAS kernel a
    machine picks decides): each entry within `max_ulp` ulps of the magnitude of its terms
    (`terms[name]`, e.g. |a| + |b| for a + b), the bound on such a difference. Not within ulps of
    the sum itself: where the terms cancel, the sum's own ulp is far finer than their rounding."""
    assert ours.keys() == theirs.keys()
    for name in ours:
        a, b = ours[name], theirs[name]
        assert a.shape == b.shape == terms[name].shape, name
        eps = torch.finfo(a.dtype).eps  # an ulp of x is at most eps * |x|
        bound = max_ulp * eps * terms[name].double() + torch.finfo(a.dtype).tiny
        excess = (a.double() - b.double()).abs() - bound
        assert excess.max().item() <= 0, f"{name}: {(excess > 0).double().mean():.2%} of entries differ by " \
                                         f"more than {max_ulp} ulp of their terms"


def assert_close_ulp(ours: dict, theirs: dict, *, max_ulp: int = 1, allow_mismatch: float = 0.0):
    """Every tensor equal within max_ulp ulps of its dtype; `allow_mismatch` is the fraction of entries
    allowed beyond that (top-k ties, where both tools may legitimately keep different entries)."""
    assert ours.keys() == theirs.keys()
    for name in ours:
        a, b = ours[name], theirs[name]
        assert a.shape == b.shape, name
        bad = (ulp_diff(a, b) > max_ulp).double().mean().item()
        assert bad <= allow_mismatch, f"{name}: {bad:.2%} of entries differ by more than {max_ulp} ulp"
