"""Same spec, inputs and seed → byte-identical output files (model card included), whatever the
thread count, chunk size or order in which tensors are evaluated."""

from __future__ import annotations

from pathlib import Path

import torch
from click.testing import CliRunner

from conftest import digests, write_spec
from mergelang.api import RunOptions, run
from mergelang.cli import main

# Random masks (dare, dare_ties), per-tensor top-k (ties), a whole-model threshold (global_topk),
# a layer gradient and slerp, composed in one formula.
SPEC = """\
base = model("base")
ft0 = model("ft0")
ft1 = model("ft1")
sparse = [dare(ft0 - base, p=0.5), dare(ft1 - base, p=0.3, seed=1)] + base
tied = ties(base, sparse, weights=[0.6, 0.4], density=0.3, global_topk=true)
output slerp(tied, dare_ties(base, [ft0, ft1], weights=[0.5, 0.5], density=0.5), t=layers(0.2, 0.7))
"""
SHARD = "30KB"  # several shards and an index, so the layout is compared too



def test_bytes_do_not_depend_on_threads_chunks_or_order(family, tmp_path):
    spec = write_spec(family, SPEC, "reproducible.ml")
    outs = {}
    threads = torch.get_num_threads()
    try:
        for j in ("1", "2"):
            out = tmp_path / f"j{j}"
            result = CliRunner().invoke(main, ["run", str(spec), "-o", str(out), "--seed", "11", "-j", j,
                                               "--shard-size", SHARD, "-q"], catch_exceptions=False)
            assert result.exit_code == 0, result.output
            outs[f"-j {j}"] = digests(out)
    finally:
        torch.set_num_threads(threads)
    # 7 rows of 32 at a time, and more rows; tensors last to first, one at a time (in the order
    # checked below) and two side by side (largest first, each finishing when it may).
    order: list[str] = []
    for chunk, j in ((224, 1), (4096, 2)):
        out = tmp_path / f"chunk{chunk}"
        order.clear()
        try:
            torch.set_num_threads(j)
            run(spec, out, RunOptions(seed=11, shard_size=30_000, chunk=chunk, reverse=True),
                lambda tp, n: order[-1:] == [tp.name] or order.append(tp.name))
        finally:
            torch.set_num_threads(threads)
        outs[f"chunk {chunk}, reversed, -j {j}"] = digests(out)
        if j == 1:
            reversed_order = list(order)
    reference = outs["-j 1"]
    assert "README.md" in reference and "model.safetensors.index.json" in reference
    assert sum(name.endswith(".safetensors") for name in reference) > 1
    for setting, found in outs.items():
        assert found == reference, setting

    # The comparison can fail: another seed changes the shards and the card's record, not the config.
    forward: list[str] = []
    try:
        torch.set_num_threads(1)
        run(spec, tmp_path / "seed12", RunOptions(seed=12, shard_size=30_000),
            lambda tp, n: forward[-1:] == [tp.name] or forward.append(tp.name))
    finally:
        torch.set_num_threads(threads)
    assert len(forward) > 10 and reversed_order == forward[::-1]
    other = digests(tmp_path / "seed12")
    assert other.keys() == reference.keys()
    assert other["README.md"] != reference["README.md"]
    assert any(other[n] != reference[n] for n in other if n.endswith(".safetensors"))
    assert other["config.json"] == reference["config.json"]
