"""Compiled evaluation of elementwise regions: one generated function per region, compiled by
torch.compile (inductor) into one loop over a chunk, with the same bits as the eager path.

A region (schedule.region: a tuple of Steps) becomes straight-line Python source, one line per
step: loads convert the chunk as read (bf16, f16 or f32) to float32, constants are baked in,
reductions and tensor ops (leaves of the region) are runtime inputs, every other step calls the
op's kernel with its parameters bound. Ops whose kernels branch on Python integers per chunk get a
traceable twin here (`dare` and `keep_random`: the rng mixer on int64 lanes, keyed by runtime
tensors; `keep_top`, `keep_band`, `top_mask`: the rank-key comparison on runtime cutoffs).
Ops outside FUSABLE (transcendentals, whose vectorized code may differ, and cross-input
reductions) keep their region eager.

Bit-identity: inductor's C++ is compiled with -ffp-contract=off (no FMA contraction; set here
explicitly), float32 arithmetic in graph order, bf16/f16 → f32 exact. tests/test_fusion.py checks
every op against the eager path.

Whether compiling pays is decided per region (cost model in `Fuser.worth`): the elements the plan
pushes through the region (summed over every output tensor whose graph has the same interned
region) times the time saved per element, against a compile cost that is lower when this region's
code was compiled before (inductor's FX graph cache keeps it on disk across processes; a marker
file under the same cache directory records that). A run compiles at all only when some region
could repay a cold compile (`Fuser.may_compile`); below that, the executor runs tensors side by side
on the CPU threads instead. `auto` compiles only on the CPU: GPU code
(Triton) may contract multiplies and adds into FMAs, and is not verified here; `always` compiles
there too.
"""

from __future__ import annotations

import getpass
import hashlib
import logging
import math
import os
import re
import tempfile
import time
from pathlib import Path

from . import rng
from .arrays import device_type, to_torch
from .graph import walk
from .io import DTYPES
from .lazy import torch
from .native_regions import NativeRegions
from .ops import OPS
from .ops.fast import zero_unless
from .ops.select import INDEX_BITS, KEEP_NONE
from .schedule import Step, region

log = logging.getLogger(__name__)

MODES = ("auto", "always", "never")
ENV = "MERGELANG_COMPILE"
MASK32 = 0xFFFFFFFF
_M2_SIGNED = rng.M2 - (1 << 32)  # ≡ M2 mod 2^32, small enough that int64 products never overflow

# Cost model (seconds), measured on a 2-core x86 machine (see docs/pipeline.md).
COLD_COMPILE_S = 12.0  # dynamo + inductor + the C++ compiler, a region of a few ops
WARM_COMPILE_S = 3.0  # the same with inductor's FX graph cache already holding the code
STARTUP_S = 2.0  # importing dynamo and inductor, once per process
SAVED_PER_ELEMENT_STEP_S = 0.8e-9  # eager time saved per element and non-constant region step


_compiled_in_process = False  # dynamo and inductor are imported and warm


def default_mode() -> str:
    mode = os.environ.get(ENV, "auto")
    if mode not in MODES:
        raise ValueError(f"{ENV} must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


# ---- traceable twins of ops that branch per chunk ------------------------------------------------

def _draws(n: int, start: torch.Tensor, k0: torch.Tensor, k1: torch.Tensor, device) -> torch.Tensor:
    """rng's keyed mixer for elements start .. start+n-1 (one 2^32 block), on int64 lanes in [0, 2^32)."""
    x = ((torch.arange(n, dtype=torch.int64, device=device) + start) & MASK32) ^ k0
    x = x ^ (x >> 16)
    x = (x * rng.M1) & MASK32
    x = x ^ ((x >> 15) ^ k1)
    x = (x * _M2_SIGNED) & MASK32
    return x ^ (x >> 16)


def _dare(x, start, k0, k1, *, p: float, seed: int):
    if p == 0:
        return x
    keep = _draws(x.numel(), start, k0, k1, x.device) < rng.threshold(1.0 - p)
    return zero_unless(keep.view(x.shape), x / (1.0 - p))


def _keep_random(x, start, k0, k1, *, density: float, seed: int):
    if density >= 1:
        return x
    keep = _draws(x.numel(), start, k0, k1, x.device) < rng.threshold(density)
    return zero_unless(keep.view(x.shape), x)


def _rank_parts(x, start):
    bits = (x.reshape(-1).to(torch.float32).view(torch.int32) & 0x7FFFFFFF).to(torch.int64)
    index = torch.arange(x.numel(), dtype=torch.int64, device=x.device) + start
    return bits, index


def _bound(bits, index, cutoff, lower: bool):
    """select.keep_mask's test for any chunk: key >= cutoff (lower) or key <= cutoff (upper)."""
    t = cutoff >> INDEX_BITS
    last = MASK32 - (cutoff & MASK32)
    if lower:
        return ((bits > t) | ((bits == t) & (index <= last))) & (cutoff != KEEP_NONE)
    return (bits < t) | ((bits == t) & (index >= last))


def _keep_top(x, cutoff, start):
    bits, index = _rank_parts(x, start)
    return zero_unless(_bound(bits, index, cutoff, True).view(x.shape), x)


def _keep_band(x, lower, upper, start):
    bits, index = _rank_parts(x, start)
    keep = _bound(bits, index, lower, True) & _bound(bits, index, upper, False)
    return zero_unless(keep.view(x.shape), x)


def _top_mask(x, cutoff, start):
    bits, index = _rank_parts(x, start)
    keys = (bits << INDEX_BITS) | (MASK32 - index)
    return (keys >= cutoff).view(x.shape).to(torch.float32)


def _weighted_sum(*xs, weights, normalize, divisor):
    total = xs[0] * weights[0]
    for x, w in zip(xs[1:], weights[1:]):
        total = total + x * w
    return total if divisor is None else total / divisor


def _weighted_sum_params(weights, normalize):
    """The divisor, computed once: a float32 value, so dividing by it is the eager division."""
    from .ops.consensus import ZERO_SUM, _f32_sum

    divisor = float(_f32_sum(weights)) if normalize else None
    return {"weights": weights, "normalize": normalize,
            "divisor": divisor if divisor is not None and abs(divisor) >= ZERO_SUM else None}


TWINS = {  # op → (twin, what it needs besides its inputs: "rng" keys, "start" index)
    "dare": (_dare, "rng"),
    "keep_random": (_keep_random, "rng"),
    "keep_top": (_keep_top, "start"),
    "keep_band": (_keep_band, "start"),
    "top_mask": (_top_mask, "start"),
    "weighted_sum": (_weighted_sum, ""),
}
# Ops whose registry kernels trace as they are (pure float32 torch ops, parameters baked in).
DIRECT = {"add", "sub", "mul", "div", "neg", "sum", "avg", "keep_at_least", "ifelse", "abs", "greater",
          "greater_equal", "where", "clamp", "nonzero_mask", "disjoint_merge", "count"}
FUSABLE = DIRECT | set(TWINS)


# ---- a region as source ----------------------------------------------------------------------------

class _Ref:
    def __init__(self, name: str):
        self.name = name


class RegionProgram:
    """A region as one generated function f(leaves, keys, start) → the root's chunk (float32, or
    out_dtype for an output's own region)."""

    def __init__(self, steps: tuple[Step, ...], out_dtype: torch.dtype | None = None):
        self.steps, self.out_dtype = steps, out_dtype
        self.leaves = [i for i, s in enumerate(steps) if not s.inputs and s.node.op != "const"]
        self.random = [i for i, s in enumerate(steps) if s.inputs and OPS[s.node.op].random]
        self.globals: dict = {"torch": torch, "OUT": out_dtype}
        lines = ["def region(L, R, start):"]
        slot = {i: k for k, i in enumerate(self.leaves)}
        rslot = {i: k for k, i in enumerate(self.random)}
        for i, s in enumerate(steps):
            n = s.node
            if n.op == "const":
                self.globals[f"C{i}"] = n.attr("value")
                lines.append(f"    v{i} = C{i}")
            elif n.op == "load":
                lines.append(f"    v{i} = L[{slot[i]}].to(torch.float32)")
            elif not s.inputs:
                lines.append(f"    v{i} = L[{slot[i]}]")
            else:
                spec = OPS[n.op]
                inputs, params = spec.bind([self.globals[f"C{j}"] if steps[j].node.op == "const" else _Ref(f"v{j}")
                                            for j in s.inputs])
                args = ", ".join(f"v{j}" for j in s.inputs[:len(inputs)])
                if n.op == "weighted_sum":
                    params = _weighted_sum_params(**params)
                self.globals[f"P{i}"] = params
                if n.op in TWINS:
                    twin, needs = TWINS[n.op]
                    self.globals[f"K{i}"] = twin
                    extra = {"rng": f", start, R[{2 * rslot.get(i, 0)}], R[{2 * rslot.get(i, 0) + 1}]",
                             "start": ", start", "": ""}[needs]
                    lines.append(f"    v{i} = K{i}({args}{extra}, **P{i})")
                else:
                    self.globals[f"K{i}"] = spec.kernel
                    lines.append(f"    v{i} = K{i}(None, {args}, **P{i})")
        last = f"v{len(steps) - 1}"
        if out_dtype is None:
            lines.append(f"    return {last}")
        else:  # the output chunk, converted in the same loop (a statistic is broadcast later)
            lines.append(f"    return {last}.to(OUT) if isinstance({last}, torch.Tensor) else {last}")
        self.source = "\n".join(lines) + "\n"
        self.digest = hashlib.sha256((self.source + repr(sorted(
            (k, repr(v)) for k, v in self.globals.items() if k[0] in "CPO")) + torch.__version__).encode()).hexdigest()[:32]
        code = compile(self.source, f"<mergelang region {self.digest[:12]}>", "exec")
        exec(code, self.globals)
        self.function = self.globals["region"]
        self.work = work(steps)


def work(steps: tuple[Step, ...]) -> int:
    """The passes eager evaluation makes over a chunk of the region: loads, leaves and ops."""
    return sum(s.node.op != "const" for s in steps)


def fusable(steps: tuple[Step, ...]) -> bool:
    """Every op of the region has a traceable kernel, and the region computes a tensor from data."""
    ops = [s.node.op for s in steps if s.inputs]
    return bool(ops) and all(op in FUSABLE for op in ops) and any(
        not s.inputs and s.node.op != "const" for s in steps)


def _cache_dir() -> Path:
    """Inductor's cache folder (torch._inductor.runtime.cache_dir_utils.cache_dir, which costs
    over a second to import: deciding not to compile must stay cheap)."""
    if "TORCHINDUCTOR_CACHE_DIR" in os.environ:
        return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"]).absolute()
    try:
        user = getpass.getuser()
    except (KeyError, ModuleNotFoundError, OSError):
        user = f"uid_{os.getuid()}" if hasattr(os, "getuid") else "unknown_user"
    return Path(tempfile.gettempdir()) / ("torchinductor_" + re.sub(r'[\\/:*?"<>|]', "_", user))


def _marker(digest: str) -> Path:
    return _cache_dir() / "mergelang-regions" / digest


class Fuser:
    """Compiled regions for one run: which to compile (the cost model), and their evaluation."""

    def __init__(self, mode: str = "auto", elements: dict | None = None, variants: dict | None = None):
        if mode not in MODES:
            raise ValueError(f"compile mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.mode = mode
        self.elements = elements or {}  # region root → elements the plan pushes through it
        self.variants = variants or {}  # region root → how many compiles its tensors need (one per rank)
        self.programs: dict[tuple, object] = {}  # (region, output dtype) → compiled callable, or None
        self.compile_seconds = 0.0
        self._may_compile: bool | None = None
        self.native = NativeRegions() if mode == "auto" else None  # numba loops (native_regions.py)

    @classmethod
    def for_plan(cls, plan, mode: str | None = None) -> "Fuser":
        elements: dict = {}
        ranks: dict = {}
        for tp in plan.tensors:  # the output's region, and the regions that feed its reductions
            roots = [tp.graph] + [a for n in walk(tp.graph) if n.op in OPS and OPS[n.op].kind != "elementwise"
                                  for a in n.args if a.op in OPS and OPS[a.op].kind == "elementwise"]
            for root in dict.fromkeys(roots):
                elements[root] = elements.get(root, 0) + math.prod(tp.graph_shape)
                ranks.setdefault(root, set()).add(max(1, len(tp.shape)))
        return cls(default_mode() if mode is None else mode, elements, {k: len(v) for k, v in ranks.items()})

    def may_compile(self) -> bool:
        """Whether this run may compile a region. In auto mode: whether some region could repay a cold
        compile, counting every step of its whole region (more than it keeps once the inputs of its
        reductions are kept whole). Where none could, nothing is compiled and the executor evaluates
        tensors side by side instead (execute.workers_for)."""
        if self.mode != "auto":
            return self.mode == "always"
        if self._may_compile is None:
            cost = COLD_COMPILE_S + (0 if _compiled_in_process else STARTUP_S)
            self._may_compile = any(n * work(region(root)) * SAVED_PER_ELEMENT_STEP_S > cost
                                    for root, n in self.elements.items())
        return self._may_compile

    def worth(self, program: RegionProgram) -> bool:
        if self.mode == "always":
            return True
        if self.mode == "never":
            return False
        root = program.steps[-1].node
        cost = (WARM_COMPILE_S if _marker(program.digest).exists() else COLD_COMPILE_S) * self.variants.get(root, 1)
        if not _compiled_in_process:
            cost += STARTUP_S
        saved = self.elements.get(root, 0) * program.work * SAVED_PER_ELEMENT_STEP_S
        return saved > cost

    def program(self, steps: tuple[Step, ...], out_dtype: str | None = None):
        """The compiled region (its output in the stored dtype `out_dtype` where given), or None."""
        if (steps, out_dtype) in self.programs:
            return self.programs[steps, out_dtype]
        compiled = None
        if self.may_compile() and fusable(steps):
            try:
                program = RegionProgram(steps, DTYPES[out_dtype] if out_dtype else None)
            except Exception as error:  # a parameter slot fed by a non-constant: stays eager
                log.debug("region not fusable: %s", error)
                program = None
            if program is not None and self.worth(program):
                compiled = Compiled(program)
        self.programs[steps, out_dtype] = compiled
        return compiled

    def rows_of(self, evaluator, steps: tuple[Step, ...], r0: int, r1: int, out: torch.Tensor | None = None):
        """Rows [r0, r1) of the region's root, or None where this region stays eager. `steps` is the
        region as evaluator.region_of gives it: its reductions already computed. In auto mode a
        region that native_regions can run as a numba loop runs so."""
        if self.native is not None:  # waiting for a loop another thread links (or builds): eager would import torch
            fused = self.native.rows_of(evaluator, steps, r0, r1, out, wait=True)
            if fused is not None:
                return fused
        if self.mode == "never" or (self.mode == "auto" and device_type(evaluator.device) != "cpu"):
            return None  # bit-identity is verified for inductor's C++ code; on GPUs only when asked
        root = steps[-1].node is evaluator.tp.graph  # the output: convert to its dtype in the loop
        compiled = self.program(steps, getattr(evaluator, "out_dtype", None) if root else None)
        if compiled is None:
            return None
        start = r0 * evaluator.row_size
        count = (r1 - r0) * evaluator.row_size
        if compiled.program.random and (start >> 32) != ((start + max(count, 1) - 1) >> 32):
            return None  # the chunk spans two 2^32 blocks of rng keys: eager handles that
        raw = getattr(evaluator.read, "raw", None) or evaluator.read
        leaves = []
        for i in compiled.program.leaves:
            n = steps[i].node
            if n.op == "load":
                stored = getattr(evaluator.read, "dtype", lambda model, tensor: None)(n.attr("model"), n.attr("tensor"))
                leaves.append(_not_a_view(to_torch(raw(n.attr("model"), r0, r1, n.attr("tensor")), stored)))
            else:
                full = to_torch(evaluator.full(n))
                leaves.append(full if full.dim() == 0 else _not_a_view(full[r0:r1]))
        keys = []
        for i in compiled.program.random:
            key = rng.derive_key(evaluator.options.seed, evaluator.tp.name, bytes.fromhex(steps[i].node.attr("key")))
            keys += rng._round_keys(key, start >> 32)
        device = evaluator.device
        keys_t = [torch.tensor(k, dtype=torch.int64, device=device) for k in keys]
        start_t = torch.tensor(start, dtype=torch.int64, device=device)
        return compiled(leaves, keys_t, start_t)


def _not_a_view(x: torch.Tensor) -> torch.Tensor:
    """x's memory as a tensor that is not a view. Inductor (torch 2.13) miscompiled a region whose
    input was a view of a tensor of the same shape (rows [0, n) of an n-row value): a dare mask
    came out empty. tests/test_fusion.py has the case."""
    if x._base is None:
        return x
    return torch.empty(0, dtype=x.dtype, device=x.device).set_(x.untyped_storage(), x.storage_offset(),
                                                               x.shape, x.stride())


class Compiled:
    """A compiled region; on a compile or run failure it says so once and the region runs eager."""

    def __init__(self, program: RegionProgram):
        import torch._inductor.config as inductor_config

        inductor_config.cpp.enable_floating_point_contract_flag = "off"  # no FMA: eager's rounding
        self.program = program
        self.function = torch.compile(program.function, dynamic=True, fullgraph=True)
        self.failed = False
        self.first = True

    def __call__(self, leaves, keys, start):
        if self.failed:
            return self.program.function(leaves, keys, start)
        began = time.perf_counter()
        try:
            out = self.function(leaves, keys, start)
        except Exception as error:  # a compile failure, or a recompile limit reached on a new shape
            log.warning("compiling a region failed, evaluating it eagerly: %s", error)
            self.failed = True
            return self.program.function(leaves, keys, start)  # the same code, run by eager torch
        if not self.first:
            return out
        self.first = False
        global _compiled_in_process
        _compiled_in_process = True
        log.info("compiled a region of %d steps in %.1f s", len(self.program.steps), time.perf_counter() - began)
        marker = _marker(self.program.digest)
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
        return out
