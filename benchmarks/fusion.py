"""Eager vs compiled evaluation of one output tensor's elementwise region, measured in one process.

    PYTHONPATH=. python benchmarks/fusion.py SPEC.ml [--tensor NAME] [--repeat 5]

Reads the tensor's inputs into memory once (as stored: bf16), then times the executor's chunk loop
(read → region → output dtype) with compiling off and on, alternating, and prints the medians, their
ratio and the first compiled call's time (the compile: cold when inductor's cache is empty, warm
after). Checks that both give the same bytes.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from mergelang.api import RunOptions, check
from mergelang.execute import ExecOptions, TensorEvaluator
from mergelang.fuse import Fuser
from mergelang.graph import walk
from mergelang.io import DTYPES


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("spec", type=Path)
    ap.add_argument("--tensor", default="model.layers.0.mlp.up_proj.weight")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--f32-out", action="store_true", help="compiled regions return float32 (converted after)")
    args = ap.parse_args()
    plan = check(args.spec, RunOptions())
    tp = next(t for t in plan.tensors if t.name == args.tensor)
    models = {n.attr("model") for n in walk(tp.graph) if n.op == "load"}
    shape = tp.shape
    stored = {m: plan.checkpoints[m].read(tp.name, 0, tp.numel).view(shape) for m in models}
    out_dtype = DTYPES[tp.dtype]

    convert_in_loop = not args.f32_out

    def run(mode: str, fuser=None) -> tuple[float, torch.Tensor]:
        ev = TensorEvaluator(tp, None, ExecOptions())
        read = lambda m, r0, r1: stored[m][r0:r1].to(torch.float32)  # noqa: E731  (execute._reader's conversion)
        read.raw = lambda m, r0, r1: stored[m][r0:r1]
        ev.read, ev.fuser = read, fuser if mode != "never" else None
        ev.out_dtype = out_dtype if convert_in_loop else None  # as execute sets it
        began = time.perf_counter()
        parts = [v.to(out_dtype).reshape(-1) for _, v in ev.output_chunks()]
        return time.perf_counter() - began, torch.cat(parts)

    fuser = Fuser("always")
    first, fused = run("always", fuser)
    print(f"{tp.name}: {tp.numel / 1e6:.1f}M elements; first compiled call (compile included) {first:.2f} s")
    eager_t, fused_t = [], []
    for _ in range(args.repeat):
        t, eager = run("never")
        eager_t.append(t)
        t, fused = run("always", fuser)
        fused_t.append(t)
    same = torch.equal(eager.view(torch.int16), fused.view(torch.int16))
    e, f = statistics.median(eager_t), statistics.median(fused_t)
    compiled = sum(p is not None and not p.failed for p in fuser.programs.values())
    print(f"eager {e * 1e3:.1f} ms, compiled {f * 1e3:.1f} ms (medians of {args.repeat}), ratio {e / f:.2f}x; "
          f"{compiled} region(s) compiled; same bytes: {same}")
    plan.close()


if __name__ == "__main__":
    main()
