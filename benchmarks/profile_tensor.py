"""Time (and optionally profile) the evaluation of single output tensors of a spec, in process.

Steadier than timing whole runs on a busy machine: the inputs are read into memory first, then each
named tensor is evaluated `--repeat` times through the executor's chunked path and the median CPU
time is printed, so two trees can be compared by alternating them:

    PYTHONPATH=$PWD python benchmarks/profile_tensor.py SPEC model.layers.3.mlp.down_proj.weight
    PYTHONPATH=$PWD python benchmarks/profile_tensor.py SPEC NAME --profile   # torch.profiler op table
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from mergelang.api import RunOptions, check
from mergelang.execute import ExecOptions, evaluate_in_memory
from mergelang.memory import tune_malloc
from mergelang.graph import walk


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spec", type=Path)
    ap.add_argument("tensors", nargs="+")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--profile", action="store_true", help="print torch.profiler's op table for one evaluation")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tune_malloc()
    plan = check(args.spec, RunOptions())
    by_name = {tp.name: tp for tp in plan.tensors}
    options = ExecOptions(compile="never")
    for name in args.tensors:
        tp = by_name[name]
        inputs = {}
        for n in walk(tp.graph):
            if n.op == "load":
                model, tensor = n.attr("model"), n.attr("tensor")
                value = plan.checkpoints[model].read(tensor or name).float().reshape(tp.shape)
                inputs[model if tensor is None else (model, tensor)] = value
        times = []
        for _ in range(args.repeat):
            start = time.process_time()
            evaluate_in_memory(tp, inputs, options)
            times.append(time.process_time() - start)
        print(f"{name}: {statistics.median(times) * 1000:.0f} ms CPU (median of {args.repeat}, "
              f"{args.threads} thread{'s' if args.threads > 1 else ''})")
        if args.profile:
            from torch.profiler import profile

            with profile() as prof:
                evaluate_in_memory(tp, inputs, options)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


if __name__ == "__main__":
    main()
