"""`mergelang run` end to end on tiny checkpoints, against independent torch computations."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from conftest import write_spec
from mergelang import rng
from mergelang.cli import main
from mergelang.demo import make_tiny_llama
from mergelang.graph import Node, const

CARD = """\
base = model("base")
ft0  = model("ft0")
ft1  = model("ft1")
output base + avg(dare(ft0 - base, p=0.9), dare(ft1 - base, p=0.9))
"""


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    out = {}
    for f in files:
        out.update(load_file(folder / f))
    return out


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if "mergelang-tmp" in p.name]


def reference_dare(delta: torch.Tensor, p: float, key: int) -> torch.Tensor:
    """DARE computed from the pure-Python hash, independently of the executor."""
    limit = round((1 - p) * 2**32)
    keep = torch.tensor([rng.reference_draw(key, i) < limit for i in range(delta.numel())]).view(delta.shape)
    return torch.where(keep, delta / (1 - p), torch.zeros(()))


def test_card_formula_matches_independent_computation(family, tmp_path):
    spec = write_spec(family, CARD, "card.ml")
    out = tmp_path / "merged"
    result = invoke("run", str(spec), "-o", str(out), "--seed", "7", "-q")
    assert result.exit_code == 0, result.output
    merged, b, f0, f1 = (weights(p) for p in (out, family / "base", family / "ft0", family / "ft1"))
    assert list(merged) == list(b)  # input order kept
    load = {k: Node("load", (), {"model": k}) for k in ("base", "ft0", "ft1")}
    # The mask key is the digest of each dare(...) node as written (see graph.with_random_key).
    keys = [Node("dare", [Node("sub", [load[ft], load["base"]]), const(0.9), const(0)]).digest[:16]
            for ft in ("ft0", "ft1")]
    for name in b:
        base = b[name].float()
        d0 = reference_dare(f0[name].float() - base, 0.9, rng.derive_key(7, name, keys[0]))
        d1 = reference_dare(f1[name].float() - base, 0.9, rng.derive_key(7, name, keys[1]))
        expected = (base + (d0 + d1) / 2).to(torch.bfloat16)
        assert merged[name].dtype == torch.bfloat16
        assert torch.equal(merged[name], expected), name
    config = json.loads((out / "config.json").read_text())
    assert config == json.loads((family / "base" / "config.json").read_text())
    assert (out / "generation_config.json").exists()


def test_output_loads_in_transformers_and_zero_delta_keeps_logits(family, tmp_path):
    transformers = pytest.importorskip("transformers")
    spec = write_spec(family, 'base = model("base")\nft = model("ft0")\noutput base + 0 * (ft - base)\n', "zero.ml")
    out = tmp_path / "merged"
    assert invoke("run", str(spec), "-o", str(out), "-q").exit_code == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(out)
    base = transformers.AutoModelForCausalLM.from_pretrained(family / "base")
    ids = torch.tensor([[1, 5, 9, 33, 64, 2]])
    with torch.no_grad():
        assert torch.equal(merged(ids).logits, base(ids).logits)


def test_same_seed_same_bytes_other_seed_differs(family, tmp_path):
    spec = write_spec(family, CARD, "card.ml")
    for name, seed in (("a", "3"), ("b", "3"), ("c", "4")):
        assert invoke("run", str(spec), "-o", str(tmp_path / name), "--seed", seed, "-q").exit_code == 0
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")
    assert tree_digest(tmp_path / "a")["model.safetensors"] != tree_digest(tmp_path / "c")["model.safetensors"]


@pytest.mark.parametrize("formula", [
    "base + avg(dare(ft0 - base, p=0.9), dare(ft1 - base, p=0.9))",
    "ties(base, [ft0, ft1], weights=[0.6, 0.4], density=0.3)",
    "slerp(ft0, ft1, t=0.3)",
    "dare_linear(base, [ft0, ft1], weights=[0.5, 0.5], density=0.5)",
])
def test_output_bytes_do_not_depend_on_threads_or_chunking(family, tmp_path, formula):
    spec = write_spec(family, 'base = model("base")\nft0 = model("ft0")\nft1 = model("ft1")\n'
                              f"output {formula}\n", "threads.ml")
    for name, threads in (("one", "1"), ("two", "2")):
        assert invoke("run", str(spec), "-o", str(tmp_path / name), "--seed", "3", "-j", threads, "-q").exit_code == 0
    # Seven rows of 32 at a time: reductions and random masks see many small chunks.
    assert invoke("run", str(spec), "-o", str(tmp_path / "small"), "--seed", "3", "--chunk-size", "224",
                  "-q").exit_code == 0
    assert tree_digest(tmp_path / "one") == tree_digest(tmp_path / "two") == tree_digest(tmp_path / "small")


def test_sharded_input_and_output_round_trip(family, tmp_path):
    sharded = tmp_path / "in"
    make_tiny_llama(sharded / "base", seed=0, shard_size=20_000)
    make_tiny_llama(sharded / "ft0", seed=1, base=sharded / "base", shard_size=30_000)
    make_tiny_llama(sharded / "ft1", seed=2, base=sharded / "base")
    assert (sharded / "base" / "model.safetensors.index.json").exists()
    spec = write_spec(sharded, CARD)
    assert invoke("run", str(spec), "-o", str(tmp_path / "sharded"), "--seed", "7", "--shard-size", "25KB",
                  "-q").exit_code == 0
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert not (tmp_path / "sharded" / "model.safetensors").exists()
    # The same merge from the unsharded family, written as one file, has the same tensors.
    assert invoke("run", str(write_spec(family, CARD, "card.ml")), "-o", str(tmp_path / "single"), "--seed", "7",
                  "-q").exit_code == 0
    a, b = weights(tmp_path / "sharded"), weights(tmp_path / "single")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in a.values())


def test_dtype_option_and_model_rebinding(family, tmp_path):
    spec = write_spec(tmp_path, 'base = model("nowhere/base")\nft = model("nowhere/ft")\noutput avg(base, ft)\n')
    out = tmp_path / "merged"
    result = invoke("run", str(spec), "-o", str(out), "--dtype", "fp32", "-q",
                    "--model", f"base={family / 'base'}", "--model", f"ft={family / 'ft0'}")
    assert result.exit_code == 0, result.output
    merged, b, f = weights(out), weights(family / "base"), weights(family / "ft0")
    for name in b:
        assert merged[name].dtype == torch.float32
        assert torch.equal(merged[name], (b[name].float() + f[name].float()) / 2)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"


def test_stdlib_task_arithmetic(family, tmp_path):
    spec = write_spec(family, 'base = model("base")\na = model("ft0")\nb = model("ft1")\n'
                              'output task_arithmetic(base, [a, b], weights=[0.7, 0.3], lambda=0.5)\n', "ta.ml")
    out = tmp_path / "merged"
    assert invoke("run", str(spec), "-o", str(out), "--dtype", "fp32", "-q").exit_code == 0
    merged, b, f0, f1 = (weights(p) for p in (out, family / "base", family / "ft0", family / "ft1"))
    for name in b:
        base = b[name].float()
        expected = base + 0.5 * (0.7 * (f0[name].float() - base) + 0.3 * (f1[name].float() - base))
        assert torch.allclose(merged[name], expected, rtol=0, atol=1e-7), name


# ---- bad input: a clear message, exit status 1, nothing written, inputs untouched -------------------


def assert_refused(result, out: Path, *fragments: str, code: int = 1):
    assert result.exit_code == code, result.output
    text = result.output
    for fragment in fragments:
        assert fragment in text, f"{fragment!r} not in:\n{text}"
    assert "Traceback" not in text
    assert not out.exists()
    assert leftovers(out.parent) == []


def test_missing_input_folder(family, tmp_path):
    spec = write_spec(tmp_path, 'base = model("base")\nft = model("does-not-exist")\noutput avg(base, ft)\n')
    shutil.copytree(family / "base", tmp_path / "base")
    out = tmp_path / "merged"
    assert_refused(invoke("run", str(spec), "-o", str(out)), out,
                   "error[E007]", "model `ft`", f"{spec}:2:6", '2 | ft = model("does-not-exist")', "^^^^^",
                   "--model ft=PATH")


def test_truncated_checkpoint(family, tmp_path):
    for name in ("base", "ft0"):
        shutil.copytree(family / name, tmp_path / name)
    data = (tmp_path / "ft0" / "model.safetensors").read_bytes()
    (tmp_path / "ft0" / "model.safetensors").write_bytes(data[:-100])
    spec = write_spec(tmp_path, 'base = model("base")\nft0 = model("ft0")\noutput base + (ft0 - base)\n')
    before = tree_digest(tmp_path / "base")
    out = tmp_path / "merged"
    assert_refused(invoke("run", str(spec), "-o", str(out)), out, "error[E010]", "model `ft0`", "truncated",
                   f"{spec}:2:7")
    assert tree_digest(tmp_path / "base") == before


def test_integer_dtype_is_refused(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        save_file({"w": torch.ones(2, 3), "steps": torch.arange(4)}, str(tmp_path / name / "model.safetensors"))
    spec = write_spec(tmp_path, 'a = model("a")\nb = model("b")\noutput avg(a, b)\n')
    out = tmp_path / "merged"
    assert_refused(invoke("run", str(spec), "-o", str(out)), out, "error[E011]", "cannot compute in I64",
                   "`steps`")


def test_missing_tensor_and_shape_mismatch_reported_together(tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    save_file({"x": torch.ones(2, 3), "y": torch.ones(4), "z": torch.ones(1)}, str(tmp_path / "a" / "model.safetensors"))
    save_file({"x": torch.ones(3, 2), "z": torch.ones(1)}, str(tmp_path / "b" / "model.safetensors"))
    spec = write_spec(tmp_path, 'a = model("a")\nb = model("b")\noutput a + (b - a)\n')
    result = invoke("check", str(spec))
    assert result.exit_code == 1
    assert "error[E008]: model `b` has no tensor `y`, which `a` has" in result.output
    assert "error[E009]: shapes differ in `sub`: [3, 2] vs [2, 3], for `x`" in result.output
    assert f"{spec}:3:13" in result.output and "2 errors" in result.output


def test_parameter_out_of_range_per_tensor(family, tmp_path):
    spec = write_spec(family, 'base = model("base")\nft = model("ft0")\n'
                              'output base + dare(ft - base, p=layers(0.5, 1.0))\n', "range.ml")
    result = invoke("check", str(spec))
    assert result.exit_code == 1
    assert "error[E006]: `p` of `dare` must be in [0, 1), got 1 (for `model.layers.1." in result.output
    assert f"{spec}:3:33" in result.output


def test_output_path_is_an_input(family, tmp_path):
    spec = write_spec(family, CARD, "card.ml")
    before = tree_digest(family / "ft0")
    result = invoke("run", str(spec), "-o", str(family / "ft0"), "--force")
    assert result.exit_code == 1 and "error[E012]" in result.output and "is the input model `ft0`" in result.output
    assert tree_digest(family / "ft0") == before


def test_existing_output_needs_force(family, tmp_path):
    spec = write_spec(family, CARD, "card.ml")
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = invoke("run", str(spec), "-o", str(out))
    assert result.exit_code == 1 and "already exists" in result.output and "--force" in result.output
    assert (out / "keep.txt").read_text() == "mine"
    assert invoke("run", str(spec), "-o", str(out), "--force", "-q").exit_code == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()


def test_interrupt_midway_leaves_nothing(family, tmp_path, monkeypatch):
    from mergelang.io import writer as writer_module

    calls = {"n": 0}
    real_write = writer_module.ShardedWriter.write

    def interrupted_write(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(writer_module.ShardedWriter, "write", interrupted_write)
    spec = write_spec(family, CARD, "card.ml")
    before = {m: tree_digest(family / m) for m in ("base", "ft0", "ft1")}
    out = tmp_path / "merged"
    assert_refused(invoke("run", str(spec), "-o", str(out), "-q"), out, "interrupted", "nothing was written",
                   code=130)
    assert calls["n"] == 5
    assert {m: tree_digest(family / m) for m in ("base", "ft0", "ft1")} == before


def test_full_disk_midway_leaves_nothing(family, tmp_path, monkeypatch):
    import errno
    import os

    from mergelang.io import writer as writer_module

    calls = {"n": 0}

    def full_pwrite(fd, data, offset):
        calls["n"] += 1
        if calls["n"] > 10:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return os.pwrite(fd, data, offset)

    monkeypatch.setattr(writer_module.os, "pwrite", full_pwrite)
    spec = write_spec(family, CARD, "card.ml")
    out = tmp_path / "merged"
    assert_refused(invoke("run", str(spec), "-o", str(out), "-q"), out, "error[E019]", "disk filled up",
                   "nothing was written")


def test_bad_cli_values(family, tmp_path):
    spec = write_spec(family, CARD, "card.ml")
    out = tmp_path / "merged"
    for args, fragment in ((["--dtype", "int8"], "unknown dtype"), (["--shard-size", "lots"], "expected a size"),
                           (["--model", "nonsense"], "expected NAME=PATH"), (["--device", "warp9"], "--device")):
        result = invoke("run", str(spec), "-o", str(out), *args)
        assert result.exit_code == 2 and fragment in result.output, result.output
        assert not out.exists()
    result = invoke("run", str(spec), "-o", str(out), "--model", "ft9=/x")
    assert_refused(result, out, "the spec has no model named `ft9`", "base, ft0, ft1")


def test_embeddings_of_different_vocabularies_are_cut_to_the_common_rows(tmp_path):
    gen = torch.Generator().manual_seed(0)
    a = {"model.embed_tokens.weight": torch.randn(7, 3, generator=gen), "lm_head.weight": torch.randn(7, 3, generator=gen),
         "w": torch.randn(2, 2, generator=gen)}
    b = {"model.embed_tokens.weight": torch.randn(5, 3, generator=gen), "lm_head.weight": torch.randn(5, 3, generator=gen),
         "w": torch.randn(2, 2, generator=gen)}
    for name, tensors in (("a", a), ("b", b)):
        (tmp_path / name).mkdir()
        save_file(tensors, str(tmp_path / name / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "a" / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 7}))
    spec = write_spec(tmp_path, 'a = model("a")\nb = model("b")\noutput avg(a, b)\n')
    out = tmp_path / "merged"
    result = invoke("run", str(spec), "-o", str(out), "-q")
    assert result.exit_code == 0, result.output
    assert "warning[E009]: the models' vocabularies differ" in result.output and "keeps the 5 rows" in result.output
    merged = weights(out)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(merged[name], (a[name][:5] + b[name]) / 2)
    assert torch.equal(merged["w"], (a["w"] + b["w"]) / 2)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 5
    # Other tensors of different shapes are still an error.
    save_file({**b, "w": torch.randn(3, 2)}, str(tmp_path / "b" / "model.safetensors"), metadata={"format": "pt"})
    result = invoke("check", str(spec))
    assert result.exit_code == 1 and "shapes differ in `avg`" in result.output
