"""The streaming executor: every output tensor is computed in chunks of its flattened elements
and written into place, so memory holds a few chunks, never a whole model (nor a whole tensor).

All current ops are elementwise, so element i of the output depends only on element i of the
inputs (and on i itself, for random ops): a chunk reads the same range of every input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .check import Plan, TensorPlan
from .io import DTYPES, ShardedWriter
from .ops import OPS, KernelContext
from .rng import derive_key
from .schedule import schedule

DEFAULT_CHUNK = 1 << 20  # elements


@dataclass
class ExecOptions:
    seed: int = 0
    device: str = "cpu"
    chunk: int = DEFAULT_CHUNK


def evaluate_chunk(tp: TensorPlan, read: Callable[[str, int, int], torch.Tensor], start: int, stop: int,
                   options: ExecOptions) -> torch.Tensor:
    """Elements [start, stop) of the flattened output tensor, in float32 on options.device.

    `read(model, start, stop)` returns those elements of this tensor in `model` as float32.
    """
    device = torch.device(options.device)
    steps = schedule(tp.graph)
    values: dict[int, object] = {}
    ctx = KernelContext(tensor=tp.name, start=start, seed=options.seed, device=device)
    for i, step in enumerate(steps):
        node = step.node
        if node.op == "const":
            values[i] = node.attr("value")
        elif node.op == "load":
            values[i] = read(node.attr("model"), start, stop)
        else:
            spec = OPS[node.op]
            args = [values[j] for j in step.inputs]
            n_in = len(args) - len(spec.params)
            params = {p.name: p.convert(v) for p, v in zip(spec.params, args[n_in:])}
            if spec.random:
                ctx.key = derive_key(options.seed, tp.name, bytes.fromhex(node.attr("key")))
            values[i] = spec.kernel(ctx, *args[:n_in], **params)
        for j in step.free:
            del values[j]
    return values[len(steps) - 1]


def execute(plan: Plan, writer: ShardedWriter, options: ExecOptions,
            on_progress: Callable[[TensorPlan, int], None] | None = None) -> None:
    """Compute every planned tensor and stream it into the writer."""
    device = torch.device(options.device)

    for tp in plan.tensors:
        numel = tp.numel
        def read(model: str, start: int, stop: int, name=tp.name) -> torch.Tensor:
            raw = plan.checkpoints[model].read(name, start, stop)
            return raw.to(device=device, dtype=torch.float32, non_blocking=True)

        out_dtype = DTYPES[tp.dtype]
        for start in range(0, max(numel, 1), options.chunk):
            stop = min(numel, start + options.chunk)
            if stop <= start:
                break
            result = evaluate_chunk(tp, read, start, stop, options)
            writer.write(tp.name, start, result.to(dtype=out_dtype).to("cpu").contiguous())
            if on_progress:
                on_progress(tp, (stop - start) * out_dtype.itemsize)
        if numel == 0 and on_progress:
            on_progress(tp, 0)
