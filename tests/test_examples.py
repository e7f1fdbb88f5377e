"""Every examples/*.ml runs on tiny checkpoints and gives what an independent torch formula gives."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from mergelang import rng
from mergelang.cli import main
from mergelang.graph import Node, const
from oracle import load_folder

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def layer_of(name: str) -> int | None:
    """K of `model.layers.K....`, None outside the layer stack."""
    parts = name.split(".")
    return int(parts[2]) if parts[:2] == ["model", "layers"] else None


def ref_dare_avg(m, name):
    base = m["base"]
    out = 0
    for ft in ("ft0", "ft1"):
        written = Node("dare", [Node("sub", [Node("load", (), {"model": ft}), Node("load", (), {"model": "base"})]),
                                const(0.9), const(0)])
        key = rng.derive_key(7, name, written.digest[:16])
        keep = torch.tensor([rng.reference_draw(key, i) < round(0.1 * 2**32) for i in range(base.numel())]).view(base.shape)
        out = out + torch.where(keep, (m[ft] - base) / (1 - 0.9), 0.0)
    return base + out / 2


def ref_per_tensor(m, name):
    if "self_attn" in name:
        t = 0.2
    elif "mlp" in name:
        t = (0.3, 0.9)[layer_of(name)]  # layers(0.3, 0.9) over the 2 layers
    else:
        t = 0.5
    return (1 - t) * m["ft0"] + t * m["ft1"]


def ref_task_arithmetic(m, name):
    base = m["base"]
    return base + 0.8 * (0.6 * (m["ft0"] - base) + 0.4 * (m["ft1"] - base))


def ref_frankenmerge(models, name):
    """Takes whole models (output layers are built from other layers): ft0's layers 0-1, then ft1's
    and the base's layers 0-1 mixed with t over that part's 2 layers; the embedding from the first
    part; the final norm and head from the last part, at t = 0."""
    k = layer_of(name)
    if k is not None and k < 2 or "embed_tokens" in name:
        return models["ft0"][name]
    t = 0.5
    if k is not None:
        name = name.replace(f"layers.{k}.", f"layers.{k - 2}.")
        t = (0.5, 0.9)[k - 2]  # layers(0.5, 0.9) over the part's 2 layers
    return (t * models["ft1"][name] + 0.5 * models["base"][name]) / (t + 0.5)


REFERENCES = {"dare_avg": ref_dare_avg, "per_tensor": ref_per_tensor, "task_arithmetic": ref_task_arithmetic,
              "frankenmerge": ref_frankenmerge}
WHOLE_MODEL_REFERENCES = {"frankenmerge"}  # references that read other tensors than the output's name


@pytest.mark.parametrize("example", sorted(p.stem for p in EXAMPLES.glob("*.ml")))
def test_example(example, family, tmp_path):
    assert example in REFERENCES, f"examples/{example}.ml needs a reference formula in this test"
    spec = EXAMPLES / f"{example}.ml"
    bind = [arg for m in ("base", "ft0", "ft1") for arg in ("--model", f"{m}={family / m}")]
    check = CliRunner().invoke(main, ["check", str(spec), *bind])
    assert check.exit_code == 0, check.output
    out = tmp_path / "out"
    run = CliRunner().invoke(main, ["run", str(spec), "-o", str(out), "--seed", "7", "--dtype", "fp32", "-q", *bind])
    assert run.exit_code == 0, run.output
    merged = load_folder(out)
    models = {m: load_folder(family / m) for m in ("base", "ft0", "ft1")}
    for name, got in merged.items():
        if example in WHOLE_MODEL_REFERENCES:
            expected = REFERENCES[example]({m: {k: v.float() for k, v in t.items()} for m, t in models.items()}, name)
        else:
            expected = REFERENCES[example]({m: t[name].float() for m, t in models.items()}, name)
        assert torch.allclose(got, expected, rtol=1e-6, atol=1e-7), name
