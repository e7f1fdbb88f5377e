"""The streaming executor.

An output tensor is computed in chunks of whole rows (dim 0) and written into place, so memory
holds a few chunks, never a whole model. A chunk evaluates the tensor's *elementwise region*:
the elementwise ops reachable from the root without crossing a reduce, tensor or model op. Those
ops are leaves of the region, evaluated first (a reduction streams its own input region chunk by
chunk, after keeping that input whole if it fits a budget; a tensor op materializes its inputs)
and cached for the tensor. Model ops (statistics over every tensor) are computed before any
tensor is written, by `model_statistics`.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import threading
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from . import tapped
from .arrays import NUMPY_DTYPES, device_type, is_torch, to_torch
from .check import Plan, TensorPlan
from .io import DTYPES, ShardedWriter
from .io.safetensors_format import ITEMSIZES
from .io.torch_bin import BinCheckpoint
from .overlap import ReadAhead, WriteBehind, for_each_parallel
from .fuse import Fuser, default_mode
from .graph import Node, walk
from .lazy import torch, torch_threads
from .memory import tune_malloc
from .ops import OPS, KernelContext
from .rng import derive_key
from .schedule import is_leaf, region

# Elements per chunk: 4 MB of float32. Each chunk costs Python and kernel calls on top of its
# entries; since reads are mapped, halving that count pays more than a chunk's temporaries fitting
# the L2 cache (half this size, mergelang was 8-12% slower on the benchmark family, eager 9%).
DEFAULT_CHUNK = 1 << 20
# An elementwise value that several reductions (or a reduction and the output) consume is computed
# once and kept whole when it fits this budget; beyond it, each consumer recomputes it chunk by chunk.
MATERIALIZE_BYTES = 256 << 20

# (model, first row, end row, tensor) → float32 chunk (a torch tensor); tensor is the load's own name
# (a load inside `layer_range` reads another layer), None for the output tensor's name. Its `raw`
# reads the rows as stored (a numpy array on the CPU: arrays.py), `dtype` names the stored dtype.
Reader = Callable[[str, int, int, "str | None"], "torch.Tensor"]


@dataclass
class ExecOptions:
    seed: int = 0
    device: str = "cpu"
    chunk: int = DEFAULT_CHUNK
    reverse: bool = False  # evaluate the tensors last to first: tests check the bytes do not change
    compile: str | None = None  # auto | always | never (fuse.py); None: $MERGELANG_COMPILE or auto
    threads: int | None = None  # CPU threads (-j); None: execute.cpu_threads()


def tensor_order(plan: Plan, options: ExecOptions) -> list[TensorPlan]:
    return plan.tensors[::-1] if options.reverse else plan.tensors


class TensorEvaluator:
    """Evaluates one planned tensor: chunks of rows, with its reductions and tensor ops cached."""

    fuser: Fuser | None = None  # compiled regions (execute sets it)
    out_dtype: str | None = None  # the output's stored dtype: its compiled regions may return chunks in it
    keep_loads = False  # keep inputs that several regions read whole (needs read.raw; see load_rows)
    budget = MATERIALIZE_BYTES  # bytes of whole values kept for this tensor (workers side by side share it)

    def __init__(self, tp: TensorPlan, read: Reader, options: ExecOptions):
        self.tp, self.read, self.options = tp, read, options
        self.device = options.device  # a string: torch is not needed to tell the CPU (arrays.device_type)
        self.shape = tp.graph_shape if tp.shape else (1,)  # a 0-d tensor is evaluated as one row of one
        self.rows = self.shape[0]
        self.row_size = math.prod(self.shape[1:])
        self.cache: dict[Node, object] = {}  # whole values: torch tensors, or numpy arrays from the loops
        self.cached_bytes = 0
        self.loads: dict[Node, object] = {}  # load → the whole input, as stored
        self._shared: frozenset[Node] | None = None
        self._consumers: dict[Node, list[Node]] | None = None

    def chunk_rows(self) -> int:
        """Rows per chunk: options.chunk entries' worth, at least one."""
        return max(1, self.options.chunk // max(1, self.row_size))

    def chunks(self, first: int = 0, end: int | None = None) -> Iterator[tuple[int, int]]:
        end = self.rows if end is None else end
        step = self.chunk_rows()
        for r0 in range(first, end, step):
            yield r0, min(end, r0 + step)

    def tail_chunks(self) -> Iterator[tuple[int, int]]:
        """The rows after those the graph computes, copied from the tail model (see TensorPlan.tail)."""
        return self.chunks(self.rows, self.tp.shape[0]) if self.tp.tail else iter(())

    def context(self, r0: int) -> KernelContext:
        return KernelContext(tensor=self.tp.name, start=r0 * self.row_size, seed=self.options.seed,
                             device=self.device)

    def rows_of(self, node: Node, r0: int, r1: int, out=None):
        """Rows [r0, r1) of the value of node (computing it, or slicing a cached value): a torch
        tensor, or a numpy array where a native loop computed them. A native region writes them into
        `out` (float32, of the chunk's shape) when given, and returns it."""
        steps = self.region_of(node)
        if self.fuser is not None:
            fused = self.fuser.rows_of(self, steps, r0, r1, out)
            if fused is not None:
                return fused
        values: dict[int, object] = {}
        ctx = self.context(r0)
        for i, step in enumerate(steps):
            n = step.node
            if n.op == "const":
                values[i] = n.attr("value")
            elif n.op == "load":
                values[i] = self.load_rows(n, r0, r1)
            elif not step.inputs:  # a reduction, a tensor op, or a value kept whole
                full = self.full(n)
                values[i] = to_torch(full if full.ndim == 0 else full[r0:r1])
            else:
                values[i] = self.apply(n, [values[j] for j in step.inputs], ctx)
            for j in step.free:
                del values[j]
        return values[len(steps) - 1]

    def region_of(self, node: Node):
        """node's region over this tensor's cached values, with its reductions and tensor ops computed
        first: keeping their inputs whole makes those leaves of the region, so not even the first
        chunk reads the inputs below them again."""
        steps = region(node, frozenset(self.cache))
        while True:
            cached = len(self.cache)
            for s in steps:
                if not s.inputs and s.node.op not in ("const", "load"):
                    self.full(s.node)
            if len(self.cache) == cached:
                return steps
            steps = region(node, frozenset(self.cache))

    def shared_loads(self) -> frozenset[Node]:
        """The loads that more than one region of this tensor reads (ties' base, read for every
        fine-tune's delta and again for the output): the output's region and the regions under the
        inputs of its reductions and tensor ops, each stopping at every reduction input that is kept
        whole. That counts an input below one that keep_inputs leaves out (x in
        l1_ratio(x, keep_random(x))) once, though its pass reads it again: kept whole, it would take
        the budget from the mask's result, which costs more to recompute eagerly.

        The inputs of reductions a native loop taps (tapped.py) are not kept whole here: their
        loads are, and the loops compute them again from those. Kept whole, ties' deltas took twice
        the memory of the fine-tunes (float32 against bf16), and writing and reading them back cost
        the time that recomputing them saves (0.13 GB less at the peak of dare_linear and of ties
        on the benchmark family, the time the same)."""
        if self._shared is None:
            ops = [n for n in walk(self.tp.graph) if n.op in OPS and OPS[n.op].kind != "elementwise"]
            # the inputs of reductions are kept whole (keep_whole): regions above them stop there
            loops = getattr(self.fuser, "native", None)
            native = loops is not None and loops.may_run(self.device)
            kept = frozenset(a for n in ops if OPS[n.op].kind != "tensor"
                             and not (native and hasattr(OPS[n.op].kernel, "taps"))
                             for a in n.args if not is_leaf(a))
            roots = [self.tp.graph] + [a for n in ops for a in n.args if a.op != "const"]
            count: dict[Node, int] = {}
            for root in dict.fromkeys(roots):
                for step in region(root, kept - {root}):
                    if step.node.op == "load":
                        count[step.node] = count.get(step.node, 0) + 1
            self._shared = frozenset(n for n, k in count.items() if k > 1)
        return self._shared

    def load_rows(self, node: Node, r0: int, r1: int) -> "torch.Tensor":
        """Rows [r0, r1) of an input, as float32. With keep_loads, an input that several regions read
        is read once, whole and as stored, when it fits the budget, and sliced after that."""
        whole = self._whole_load(node)
        if whole is None:
            return self.read(node.attr("model"), r0, r1, node.attr("tensor"))
        return to_torch(whole[r0:r1], self.read.dtype(node.attr("model"), node.attr("tensor"))).to(torch.float32)

    def load_raw(self, node: Node, r0: int, r1: int):
        """The same rows as stored (bf16, f16 or f32), for compiled and native regions."""
        whole = self._whole_load(node)
        if whole is None:
            return self.read.raw(node.attr("model"), r0, r1, node.attr("tensor"))
        return whole[r0:r1]

    def _whole_load(self, node: Node):
        whole = self.loads.get(node)
        if whole is None and self.keep_loads and node in self.shared_loads():
            model, tensor = node.attr("model"), node.attr("tensor")
            nbytes = self.rows * self.row_size * self.read.itemsize(model, tensor)
            if self.cached_bytes + nbytes <= self.budget:
                whole = self.loads[node] = self.read.raw(model, 0, self.rows, tensor)
                self.cached_bytes += whole.nbytes
        return whole

    def apply(self, node: Node, args: list, ctx: KernelContext):
        spec = OPS[node.op]
        inputs, params = spec.bind(args)
        if spec.random:
            ctx.key = derive_key(self.options.seed, self.tp.name, bytes.fromhex(node.attr("key")))
        return spec.kernel(ctx, *inputs, **params)

    def full(self, node: Node):
        """The whole value of a reduce, model or tensor node (cached for this tensor). A reduction's
        first pass runs inside the native loop of its input where it can (tapped.py), with those of
        the tensor's other reductions over the same loads."""
        if node in self.cache:
            return self.cache[node]
        spec = OPS[node.op]
        n_in, _ = spec.layout(len(node.args))
        inputs, constants = node.args[:n_in], [a.attr("value") for a in node.args[n_in:]]
        if spec.kind not in ("reduce", "model"):
            args = [self._as_tensor(self.rows_of(a, 0, self.rows), self.rows) for a in inputs]
            self.cache[node] = self.apply(node, args + constants, self.context(0))
            return self.cache[node]
        native = getattr(self.fuser, "native", None)
        group, members = [node], [tapped.plan(self, native, inputs, self._reducer(node))]
        for n in tapped.siblings(self, node):  # after planning node's: that may have computed some
            group.append(n)
            members.append(tapped.plan(self, native, tapped.inputs_of(n), self._reducer(n)))
        for n, m, was_tapped in zip(group, members, tapped.first_passes(self, members)):
            self.cache[n] = self._reduce(n, m.inputs, m.reducer, was_tapped)
        return self.cache[node]

    def _reducer(self, node: Node):
        spec = OPS[node.op]
        n_in, _ = spec.layout(len(node.args))
        _, params = spec.bind([None] * n_in + [a.attr("value") for a in node.args[n_in:]])
        # A model statistic not computed beforehand (evaluating one tensor alone) covers this tensor.
        size = self.shape if spec.kind == "reduce" else self.rows * self.row_size
        return spec.kernel(self.context(0), size, **params)

    def _reduce(self, node: Node, inputs, reducer, tapped_first: bool):
        """The reduction's passes over the chunks (all but the first where that one was tapped)."""
        if not tapped_first:
            self.keep_inputs(node, inputs)
        pass_ = 0
        while True:
            for r0, r1 in () if tapped_first and pass_ == 0 else self.chunks():
                if getattr(reducer, "pass_complete", False):
                    break  # the reducer needs no more chunks in this pass (a scan that found its entry)
                reducer.update(pass_, *[self._as_tensor(self.rows_of(a, r0, r1), r1 - r0) for a in inputs])
            if reducer.end_pass(pass_):
                return reducer.result()
            pass_ += 1

    def keep_inputs(self, node: Node, inputs) -> None:
        """Keep the inputs of reduction `node` whole (keep_whole). An input that another input is
        computed from comes after it, and is not kept when every consumer of it but `node` is kept
        by then: l1_ratio(x, keep_random(x)) keeps the mask's result, and its one pass recomputes x
        (a subtraction), leaving the budget to values that other regions read."""
        below = {a: any(a in {s.node for s in region(b)} for b in inputs if b is not a) for a in inputs}
        for a in sorted(inputs, key=below.__getitem__):  # stable: inputs others are computed from last
            if not (below[a] and all(c is node or c in self.cache for c in self.consumers().get(a, ()))):
                self.keep_whole(a)

    def consumers(self) -> dict[Node, list[Node]]:
        """Node → the nodes of this tensor's graph that take it as an argument."""
        if self._consumers is None:
            self._consumers = {}
            for n in walk(self.tp.graph):
                for a in dict.fromkeys(n.args):
                    self._consumers.setdefault(a, []).append(n)
        return self._consumers

    def keep_whole(self, node: Node) -> None:
        """Compute an elementwise value once, chunk by chunk, into a whole tensor that later passes
        and consumers slice, when it fits the budget (else each pass recomputes it from its inputs)."""
        if node in self.cache or is_leaf(node):
            return
        nbytes = self.rows * self.row_size * 4
        if self.cached_bytes + nbytes > self.budget:
            return
        whole = self.empty_float32(self.shape)
        for r0, r1 in self.chunks():
            part = whole[r0:r1]
            value = self.rows_of(node, r0, r1, part)
            if value is not part:
                part[...] = value
        self.cache[node] = whole
        self.cached_bytes += nbytes

    def empty_float32(self, shape: tuple[int, ...]):
        """A new float32 array: numpy's on the CPU (the loops write into it), else a tensor on the device."""
        if device_type(self.device) == "cpu":
            return np.empty(shape, dtype=np.float32)
        return torch.empty(shape, dtype=torch.float32, device=self.device)

    def _as_tensor(self, value, nrows: int) -> "torch.Tensor":
        """A chunk of nrows full rows, as a torch tensor: scalars and row-wise statistics are
        broadcast (without copying), a numpy chunk viewed (arrays.to_torch)."""
        shape = (nrows,) + tuple(self.shape[1:])
        value = to_torch(value, self.out_dtype)  # (a numpy chunk of bits is the output's, in its dtype)
        if is_torch(value) and tuple(value.shape) == shape:
            return value
        return torch.as_tensor(value, dtype=torch.float32, device=self.device).expand(shape)

    def _as_chunk(self, value, nrows: int):
        """A chunk of nrows full rows as _as_tensor makes it, but a numpy chunk of that shape as it
        is (the writer takes it: the output's chunks from the loops need no torch)."""
        if isinstance(value, np.ndarray) and value.shape == (nrows,) + tuple(self.shape[1:]):
            return value
        return self._as_tensor(value, nrows)

    def output_chunks(self) -> Iterator[tuple[int, object]]:
        """(flat start, values) for the whole output, chunk by chunk: a torch tensor, or a numpy
        array from a loop (float32, or the output's bfloat16 as its bits)."""
        for r0, r1 in self.chunks():
            yield r0 * self.row_size, self._as_chunk(self.rows_of(self.tp.graph, r0, r1), r1 - r0)
        for r0, r1 in self.tail_chunks():
            yield r0 * self.row_size, self.read(self.tp.tail[0], r0, r1)


def evaluate_in_memory(tp: TensorPlan, inputs: dict[str, "torch.Tensor"], options: ExecOptions) -> "torch.Tensor":
    """The whole output tensor from in-memory inputs (model key, or (model key, tensor name) for a
    load that names its tensor → tensor), through the same chunked path."""
    rest = tp.shape[1:] if tp.shape else ()

    def read(model: str, r0: int, r1: int, tensor: str | None = None) -> torch.Tensor:
        value = inputs[model if tensor is None else (model, tensor)]
        return value.reshape((-1,) + tuple(rest))[r0:r1].to(device=options.device, dtype=torch.float32)

    parts = [to_torch(values).reshape(-1) for _, values in TensorEvaluator(tp, read, options).output_chunks()]
    return torch.cat(parts).reshape(tp.shape) if parts else torch.empty(tp.shape)


def _predicted_reads(plan: Plan, options: ExecOptions):
    """The reads `execute` will make, in order: per tensor, per chunk, its region's loads."""
    for tp in tensor_order(plan, options):
        evaluator = TensorEvaluator(tp, None, options)
        loads = [(step.node.attr("model"), step.node.attr("tensor") or tp.name)
                 for step in region(tp.graph) if step.node.op == "load"]
        for r0, r1 in evaluator.chunks():
            for model, tensor in loads:
                yield model, tensor, r0 * evaluator.row_size, r1 * evaluator.row_size
        for r0, r1 in evaluator.tail_chunks():
            yield tp.tail[0], tp.name, r0 * evaluator.row_size, r1 * evaluator.row_size


def _reader(plan: Plan, tp: TensorPlan, evaluator: "TensorEvaluator", device,
            read_array: Callable[[str, str, int, int], np.ndarray]) -> Reader:
    """Rows [r0, r1) of this tensor in a model, as float32 on the device; `raw`: as stored."""
    cpu = device_type(device) == "cpu"
    rest, row = tuple(evaluator.shape[1:]), evaluator.row_size

    def dtype(model: str, tensor: str | None = None) -> str:
        """The dtype the checkpoint stores the tensor in (its safetensors code)."""
        return plan.checkpoints[model].tensors[tensor or tp.name].dtype

    def read_as_stored(model: str, r0: int, r1: int, tensor: str | None = None):
        """The rows in the checkpoint's dtype (loops and compiled regions convert them in their loop):
        a numpy array on the CPU (arrays.NUMPY_DTYPES), else a tensor copied to the device from
        pinned memory."""
        raw = read_array(model, tensor or tp.name, r0 * row, r1 * row).reshape((r1 - r0,) + rest)
        if cpu:
            return raw
        return to_torch(raw, dtype(model, tensor)).pin_memory().to(device=device, non_blocking=True)

    def read(model: str, r0: int, r1: int, tensor: str | None = None) -> "torch.Tensor":
        return to_torch(read_as_stored(model, r0, r1, tensor), dtype(model, tensor)).to(torch.float32)

    read.raw, read.dtype = read_as_stored, dtype
    read.itemsize = lambda model, tensor=None: ITEMSIZES[dtype(model, tensor)]
    return read


def model_statistics(plan: Plan, options: ExecOptions) -> dict[Node, "torch.Tensor"]:
    """Every `model`-kind statistic, over all the tensors whose graph holds it, before any is written.

    Graphs are interned and loads do not name tensors, so the same expression in every tensor's
    graph is one node: its tensors are the ones it is computed over.
    """
    groups: dict[Node, list[TensorPlan]] = {}
    for tp in tensor_order(plan, options):
        for n in walk(tp.graph):
            if n.op in OPS and OPS[n.op].kind == "model":
                groups.setdefault(n, []).append(tp)
    device = options.device
    values: dict[Node, torch.Tensor] = {}
    for node, tensors in groups.items():
        spec = OPS[node.op]
        n_in, _ = spec.layout(len(node.args))
        _, params = spec.bind([None] * n_in + [a.attr("value") for a in node.args[n_in:]])
        (source,) = node.args[:n_in]
        reducer = spec.kernel(KernelContext(device=device), sum(math.prod(tp.graph_shape) for tp in tensors), **params)
        pass_ = 0
        while True:
            for tp in tensors:
                evaluator = TensorEvaluator(tp, None, options)
                evaluator.read = _reader(plan, tp, evaluator, device,
                                         lambda m, t, a, b: plan.checkpoints[m].read_array(t, a, b))
                for r0, r1 in evaluator.chunks():
                    reducer.update(pass_, evaluator._as_tensor(evaluator.rows_of(source, r0, r1), r1 - r0))
            if reducer.end_pass(pass_):
                break
            pass_ += 1
        values[node] = reducer.result()
    return values


def workers_for(options: ExecOptions, fuser: Fuser) -> int:
    """How many tensors are evaluated side by side: one per CPU thread (each single-threaded, which
    wastes less than splitting every chunk's ops across threads), or 1 on a GPU and when compiled
    regions may run (they use every thread themselves)."""
    if device_type(options.device) != "cpu" or fuser.may_compile():
        return 1
    return options.threads or cpu_threads()


def cpu_threads() -> int:
    """torch's thread count where torch is imported (a program that set it chose), else the CPUs
    this process may run on (torch's default where each is a core of its own)."""
    if "torch" in sys.modules:
        return torch.get_num_threads()
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def execute(plan: Plan, writer: ShardedWriter, options: ExecOptions,
            on_progress: Callable[[TensorPlan, int], None] | None = None) -> None:
    """Compute every planned tensor and stream it into the writer through a write-behind thread.
    Whole-model statistics come first, in passes over every tensor they cover. With several CPU
    threads, tensors are evaluated side by side; else one at a time, with reads ahead on a thread."""
    with torch_threads(options.threads) if options.threads else contextlib.nullcontext():
        _execute(plan, writer, options, on_progress)


def _execute(plan: Plan, writer: ShardedWriter, options: ExecOptions, on_progress) -> None:
    tune_malloc()
    whole_model = model_statistics(plan, options)
    fuser = Fuser.for_plan(plan, options.compile or default_mode())
    workers = workers_for(options, fuser)
    for ckpt in plan.checkpoints.values():
        if isinstance(ckpt, BinCheckpoint):  # one worker reads shards in order: one mapped is enough
            ckpt.mapped_shards = 2 if workers > 1 else 1
    behind = WriteBehind(writer.write)
    try:
        if workers > 1:
            _execute_parallel(plan, behind, options, whole_model, fuser, workers, on_progress)
        else:
            _execute_sequential(plan, behind, options, whole_model, fuser, on_progress)
        behind.close()
    except BaseException:
        behind.abort()
        raise


def _evaluate_into(evaluator: TensorEvaluator, behind: WriteBehind, on_progress, check=lambda: None) -> None:
    tp = evaluator.tp
    evaluator.out_dtype = tp.dtype
    for start, values in evaluator.output_chunks():
        check()
        data = _stored(values, tp.dtype)
        behind.put(tp.name, start, data)
        if on_progress:
            on_progress(tp, data.nbytes)
    if tp.numel == 0 and on_progress:
        on_progress(tp, 0)


def _stored(values, code: str):
    """A chunk of the output in its stored dtype, flat, contiguous and on the CPU, as the writer takes
    it: a numpy chunk already in that dtype's numpy view as it is, anything else converted by torch
    (which rounds a float32 to bfloat16, NaNs included, as the eager path does)."""
    if isinstance(values, np.ndarray) and values.dtype == NUMPY_DTYPES[code] and values.flags.c_contiguous:
        return values.reshape(-1)
    return to_torch(values).to(dtype=DTYPES[code]).reshape(-1).to("cpu").contiguous()


def _execute_sequential(plan: Plan, behind: WriteBehind, options: ExecOptions, whole_model: dict,
                        fuser: Fuser, on_progress) -> None:
    device = options.device
    ahead = ReadAhead(_predicted_reads(plan, options), lambda m, t, a, b: plan.checkpoints[m].read_array(t, a, b))
    try:
        for tp in tensor_order(plan, options):
            evaluator = TensorEvaluator(tp, None, options)
            evaluator.read = _reader(plan, tp, evaluator, device, ahead.read)
            evaluator.fuser = fuser
            evaluator.cache.update(whole_model)
            _evaluate_into(evaluator, behind, on_progress)
    finally:
        ahead.close()


def parallel_order(plan: Plan, options: ExecOptions) -> list[TensorPlan]:
    """The largest tensors first, so that the last ones to finish are small; but tensors read from
    `.bin` checkpoints by shard first, so that workers read the shards a checkpoint keeps mapped
    (see io/torch_bin.py) instead of reloading one for every chunk."""
    def key(tp: TensorPlan) -> tuple:
        shards = []
        for n in walk(tp.graph):
            ckpt = plan.checkpoints[n.attr("model")] if n.op == "load" else None
            if isinstance(ckpt, BinCheckpoint):
                shards.append(ckpt.files.index(ckpt.tensors[n.attr("tensor") or tp.name].path))
        return (*shards, -tp.numel)

    return sorted(tensor_order(plan, options), key=key)


def _execute_parallel(plan: Plan, behind: WriteBehind, options: ExecOptions, whole_model: dict,
                      fuser: Fuser, workers: int, on_progress) -> None:
    """`workers` threads, each evaluating whole tensors with one torch thread and reading its own
    chunks, in `parallel_order`. Every tensor's bytes are computed as in the sequential order:
    chunks and reductions stay in order inside it."""
    device = options.device
    lock = threading.Lock()

    def progress(tp: TensorPlan, nbytes: int) -> None:
        with lock:
            on_progress(tp, nbytes)

    def work(tp: TensorPlan, check: Callable[[], None]) -> None:
        evaluator = TensorEvaluator(tp, None, options)
        evaluator.read = _reader(plan, tp, evaluator, device, lambda m, t, a, b: plan.checkpoints[m].read_array(t, a, b))
        evaluator.keep_loads = True  # no read-ahead here to predict chunk reads
        evaluator.fuser = fuser
        evaluator.budget = MATERIALIZE_BYTES // workers
        evaluator.cache.update(whole_model)
        _evaluate_into(evaluator, behind, progress if on_progress else None, check)

    with torch_threads(1):
        for_each_parallel(parallel_order(plan, options), work, workers)
