"""Statistics of a fine-tune's delta δ = ft − base, and how much DARE drop it tolerates.

`delta_stats(ft, base)` streams both checkpoints tensor by tensor in chunks of rows (both read in
the same order, at most one chunk of each held at a time) and reports, per tensor, per layer, per
tensor kind and overall: min and max of δ, mean |δ|, max |δ| and the quantiles p50, p90, p99, p99.9
of |δ|.

Quantiles. Per tensor they are *exact*: two passes of a radix select on the float32 bits of |δ|
(the method of ops/select.py, whose bit helpers this module uses). The first pass histograms the
top 16 of the 31 magnitude bits; the second histograms the low 15 bits of the entries in the few
bins that hold the wanted order statistics. Each quantile interpolates linearly between the two
order statistics around rank q·(n−1), as `torch.quantile` does. Per layer, per kind and overall
they come from the sum of the tensors' first-pass histograms, whose bins are log-spaced (8 exponent
bits, 7 mantissa bits): each order statistic is taken as the middle of its bin, so the relative
error is at most 2^-8 (0.4 %). min, max, mean |δ| and max |δ| are exact everywhere.

The verdict follows the DARE paper (Yu et al. 2023, "Language Models are Super Mario"): deltas of
supervised fine-tunes are small (|δ| within about 0.005) and DARE drops 90–99 % of them with almost
no loss; for deltas around 0.03 (continued pre-training) DARE breaks down. The statistic it
reads is the p99 of |δ| (robust to a few outlier rows such as new tokens' embeddings); the
thresholds are SAFE_DELTA and LARGE_DELTA.

`dare_warnings(plan, reporter)` is the `check` side: for each random drop with p ≥ 0.5 (`dare`, or
the masks of dare_ties, dare_linear, della, ...) applied directly to `load − load`, it estimates
p99 |δ| from a small fixed sample of rows and warns when that is large. Drops of other values (a
merge of deltas, a LoRA delta, ...) are skipped: their magnitude is not a plain checkpoint delta.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .check import EMBEDDING_NAMES, FLOAT_DTYPES, _examples
from .diagnostics import (
    CORRUPT, DARE_LARGE_DELTA, DTYPE, INPUT, MISSING_TENSOR, SHAPE, Diagnostic, MergelangError, Reporter,
)
from .io import Checkpoint, CheckpointError
from .io.hub import HubError, locate
from .io.lora import CONFIG as ADAPTER_CONFIG
from .lazy import torch
from .ops.select import LOW_BITS, magnitude_bits
from .specialize import _LAYER, layer_index

QUANTILES = (0.5, 0.9, 0.99, 0.999)
# The DARE paper's rule of thumb, on the p99 of |δ|: up to SAFE_DELTA (typical of supervised
# fine-tuning) DARE drops 90–99 % of the delta safely; from LARGE_DELTA on (continued pre-training)
# it hurts. In between, moderate drop rates are fine and high ones need a benchmark.
SAFE_DELTA = 0.005
LARGE_DELTA = 0.03
HIGH_DROP = 0.5  # `check` warns about drops of at least this probability on large deltas
VERDICT_QUANTILE = 0.99
CHUNK_ELEMENTS = 1 << 20  # elements of each model read at a time (whole rows, at least one)

_LOW_MASK = (1 << LOW_BITS) - 1


# ---- statistics -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeltaStats:
    """Statistics of δ over some set of entries. `exact`: whether the quantiles are exact."""

    count: int
    min: float
    max: float
    mean_abs: float
    max_abs: float
    quantiles: dict[float, float]  # q → that quantile of |δ|
    exact: bool

    @property
    def p99(self) -> float:
        return self.quantiles[VERDICT_QUANTILE]

    def to_json(self) -> dict:
        return {"count": self.count, "min": self.min, "max": self.max, "mean_abs": self.mean_abs,
                "max_abs": self.max_abs, "quantiles_abs": {str(q): v for q, v in self.quantiles.items()},
                "exact_quantiles": self.exact, "verdict": level(self.p99)}


class _Summary:
    """One pass over δ: count, min, max, Σ|δ| (float64), max |δ| and the histogram of the top
    16 bits (select.HIGH_BITS) of |δ|'s float32 pattern. Summaries add up (per layer, per kind, overall)."""

    def __init__(self):
        self.count = 0
        self.min, self.max, self.max_abs = math.inf, -math.inf, 0.0
        self.abs_sum = 0.0
        self.hist = torch.zeros(0, dtype=torch.int64)  # grown to the highest bin seen (2**HIGH_BITS at most)

    def _add_hist(self, counts: torch.Tensor) -> None:
        n = counts.numel()
        if self.hist.numel() < n:
            self.hist = torch.cat([self.hist, torch.zeros(n - self.hist.numel(), dtype=torch.int64)])
        self.hist[:n] += counts

    def update(self, d: torch.Tensor, bits: torch.Tensor) -> None:
        if d.numel() == 0:
            return
        self.count += d.numel()
        self.min = min(self.min, float(d.min()))
        self.max = max(self.max, float(d.max()))
        self.max_abs = max(self.max_abs, float(d.abs().max()))
        self.abs_sum += float(d.abs().sum(dtype=torch.float64))
        self._add_hist(torch.bincount(bits >> LOW_BITS))

    def add(self, other: _Summary) -> None:
        self.count += other.count
        self.min, self.max = min(self.min, other.min), max(self.max, other.max)
        self.max_abs = max(self.max_abs, other.max_abs)
        self.abs_sum += other.abs_sum
        self._add_hist(other.hist)

    def stats(self, quantiles: dict[float, float] | None = None) -> DeltaStats:
        """With `quantiles` (exact ones), those; else the histogram's estimates."""
        if self.count == 0:
            return DeltaStats(0, 0.0, 0.0, 0.0, 0.0, {q: 0.0 for q in QUANTILES}, True)
        exact = quantiles is not None
        if quantiles is None:
            cumulative = self.hist.cumsum(0)
            mid = {r: _bin_middle(_locate(cumulative, r)[0]) for r in _ranks(self.count)}
            quantiles = {q: _lerp(mid, self.count, q) for q in QUANTILES}
        return DeltaStats(self.count, self.min, self.max, self.abs_sum / self.count, self.max_abs,
                          quantiles, exact)


def _ranks(n: int) -> set[int]:
    """The 0-based ascending ranks that the quantiles interpolate between."""
    out = set()
    for q in QUANTILES:
        pos = q * (n - 1)
        out.update({math.floor(pos), min(n - 1, math.floor(pos) + 1)})
    return out


def _lerp(values: dict[int, float], n: int, q: float) -> float:
    """torch.quantile's "linear" rule: between the order statistics around q·(n−1)."""
    pos = q * (n - 1)
    lo = math.floor(pos)
    hi = min(n - 1, lo + 1)
    return values[lo] + (pos - lo) * (values[hi] - values[lo])


def _locate(cumulative: torch.Tensor, rank: int) -> tuple[int, int]:
    """The bin of the 0-based ascending `rank`, and its 0-based rank within that bin."""
    b = int(torch.searchsorted(cumulative, torch.tensor([rank + 1], dtype=cumulative.dtype)).item())
    below = int(cumulative[b - 1].item()) if b > 0 else 0
    return b, rank - below


def _float_of(bits: int) -> float:
    return torch.tensor([bits], dtype=torch.int32).view(torch.float32).item()


def _bin_middle(b: int) -> float:
    lo = _float_of(b << LOW_BITS)
    hi = _float_of(min((b + 1) << LOW_BITS, 0x7F800000))  # the top bins hold inf and NaN
    return (lo + hi) / 2


class _ExactSelect:
    """Pass two of the radix select: the low bits of |δ| in the bins of the wanted ranks."""

    def __init__(self, summary: _Summary):
        self.n = summary.count
        cumulative = summary.hist.cumsum(0)
        self.where = {r: _locate(cumulative, r) for r in _ranks(self.n)}
        self.low = {b: torch.zeros(1 << LOW_BITS, dtype=torch.int64) for b, _ in self.where.values()}

    def update(self, bits: torch.Tensor) -> None:
        high = bits >> LOW_BITS
        for b, hist in self.low.items():
            hist += torch.bincount(bits[high == b] & _LOW_MASK, minlength=1 << LOW_BITS)

    def quantiles(self) -> dict[float, float]:
        cumulative = {b: h.cumsum(0) for b, h in self.low.items()}
        values = {r: _float_of((b << LOW_BITS) | _locate(cumulative[b], within)[0])
                  for r, (b, within) in self.where.items()}
        return {q: _lerp(values, self.n, q) for q in QUANTILES}


# ---- tensors, layers, kinds -------------------------------------------------------------------------


def tensor_kind(name: str) -> str:
    """The tensor's name without its layer prefix or `.weight`: `model.layers.3.mlp.up_proj.weight`
    → `mlp.up_proj`, `model.embed_tokens.weight` → `embed_tokens`, `lm_head.weight` → `lm_head`."""
    m = _LAYER.search(name)
    kind = name[m.end():] if m else re.sub(r"^(model|transformer)\.", "", name)
    return kind[: -len(".weight")] if kind.endswith(".weight") else kind


@dataclass(frozen=True)
class TensorDelta:
    name: str
    layer: int | None
    kind: str
    shape: tuple[int, ...]  # of the compared part (the common rows of embeddings of different vocabularies)
    stats: DeltaStats


@dataclass
class DeltaReport:
    ft: Path
    base: Path
    tensors: list[TensorDelta] = field(default_factory=list)
    by_layer: dict[int | None, DeltaStats] = field(default_factory=dict)
    by_kind: dict[str, DeltaStats] = field(default_factory=dict)
    overall: DeltaStats | None = None
    diagnostics: list[Diagnostic] = field(default_factory=list)  # warnings: what was not compared, and why

    @property
    def verdict(self) -> str:
        return verdict(self.overall.p99)

    def to_json(self) -> dict:
        return {
            "ft": str(self.ft), "base": str(self.base),
            "tensors": {t.name: {"layer": t.layer, "kind": t.kind, "shape": list(t.shape), **t.stats.to_json()}
                        for t in self.tensors},
            "by_layer": {("-" if k is None else str(k)): s.to_json() for k, s in self.by_layer.items()},
            "by_kind": {k: s.to_json() for k, s in self.by_kind.items()},
            "overall": self.overall.to_json(),
            "verdict": self.verdict,
            "warnings": [d.message for d in self.diagnostics],
        }


def level(p99: float) -> str:
    """"small", "moderate" or "large", by the p99 of |δ| against SAFE_DELTA and LARGE_DELTA."""
    if p99 >= LARGE_DELTA or math.isnan(p99):
        return "large"
    return "small" if p99 <= SAFE_DELTA else "moderate"


def verdict(p99: float) -> str:
    """One line: how much DARE drop a delta with this p99 of |δ| tolerates."""
    found = f"p99 |δ| = {p99:.3g}"
    return {
        "small": f"deltas are small ({found} ≤ {SAFE_DELTA}, typical of fine-tuning): "
                 "DARE p up to 0.9–0.99 is safe",
        "moderate": f"deltas are moderate ({found}, between {SAFE_DELTA} and {LARGE_DELTA}): "
                    "DARE p up to about 0.5–0.9 is likely fine; check higher p on an evaluation",
        "large": f"deltas are large ({found} ≥ {LARGE_DELTA}; continued pre-training?): "
                 "DARE will likely hurt; use p ≤ 0.5 or do not drop",
    }[level(p99)]


def _open(path: Path, role: str) -> Checkpoint:
    """A checkpoint folder, or a hub id `owner/name` in the local Hugging Face cache (as in a spec)."""
    try:
        path = locate(str(path), Path(path).expanduser())
    except HubError as e:
        raise MergelangError(Diagnostic(INPUT, f"the {role} model: {e.message}", notes=e.notes,
                                        help=e.help or "FT and BASE are checkpoint folders or hub ids")) from None
    if (path / ADAPTER_CONFIG).is_file():
        raise MergelangError(Diagnostic(INPUT, f"the {role} model: {path} is a LoRA adapter, not a checkpoint",
                                        help="merge it onto its base first (`output base + lora(\"ADAPTER\", "
                                             "base=base)`) and compare the result with the base"))
    try:
        return Checkpoint.open(path)
    except CheckpointError as e:
        code = INPUT if not path.exists() else CORRUPT
        raise MergelangError(Diagnostic(code, f"the {role} model: {e}",
                                        help="FT and BASE are checkpoint folders or hub ids")) from None


def _rows(shape: tuple[int, ...]) -> tuple[int, int]:
    """(rows, elements per row) of a tensor read in chunks of whole rows; a vector's rows are its entries."""
    if len(shape) < 2:
        return math.prod(shape), 1
    return shape[0], math.prod(shape[1:])


def _deltas(ft: Checkpoint, base: Checkpoint, name: str, rows: int, row_size: int, chunk: int):
    """δ in float32 for the first `rows` rows, chunk by chunk (ft and base read in step)."""
    step = max(1, chunk // max(1, row_size)) * row_size
    stop = rows * row_size
    for start in range(0, stop, step):
        end = min(stop, start + step)
        yield ft.read(name, start, end).to(torch.float32) - base.read(name, start, end).to(torch.float32)


def _comparable(name: str, ft: Checkpoint, base: Checkpoint, problems) -> tuple[int, int] | None:
    """(rows, row size) to compare for `name`, or None after recording why it cannot be."""
    a, b = ft.tensors[name], base.tensors[name]
    for role, info in (("fine-tuned", a), ("base", b)):
        if info.dtype not in FLOAT_DTYPES:
            problems[(DTYPE, f"stored as {info.dtype} in the {role} model, not floating point")].append(name)
            return None
    if a.shape == b.shape:
        return _rows(a.shape)
    if (len(a.shape) == len(b.shape) >= 2 and a.shape[1:] == b.shape[1:]
            and any(part in name for part in EMBEDDING_NAMES)):
        rows = min(a.shape[0], b.shape[0])
        problems[("note", f"vocabularies differ ({a.shape[0]} rows in the fine-tuned model, {b.shape[0]} "
                          f"in the base): only the {rows} rows they have in common are compared")].append(name)
        return rows, _rows(a.shape)[1]
    problems[(SHAPE, f"shape {list(a.shape)} in the fine-tuned model, {list(b.shape)} in the base")
             ].append(name)
    return None


def _display_order(name: str) -> tuple:
    """Layers in order, each layer's tensors by name, then the tensors outside the layer stack."""
    layer = layer_index(name)
    return (layer is None, layer or 0, name)


def delta_stats(ft_path: Path, base_path: Path, chunk: int = CHUNK_ELEMENTS) -> DeltaReport:
    """Stream ft and base and measure δ = ft − base; raises MergelangError when nothing compares."""
    ft, base = _open(ft_path, "fine-tuned"), _open(base_path, "base")
    report = DeltaReport(ft.path, base.path)
    problems: dict[tuple[str, str], list[str]] = defaultdict(list)
    layers: dict[int | None, _Summary] = defaultdict(_Summary)
    kinds: dict[str, _Summary] = defaultdict(_Summary)
    overall = _Summary()
    try:
        for name in sorted(ft.tensors, key=_display_order):
            if name not in base.tensors:
                problems[(MISSING_TENSOR, f"the base model {base.path} has no tensor")].append(name)
                continue
            shape = _comparable(name, ft, base, problems)
            if shape is None:
                continue
            rows, row_size = shape
            summary = _Summary()
            for d in _deltas(ft, base, name, rows, row_size, chunk):
                summary.update(d, magnitude_bits(d))
            exact = None
            if summary.count:
                select = _ExactSelect(summary)
                for d in _deltas(ft, base, name, rows, row_size, chunk):
                    select.update(magnitude_bits(d))
                exact = select.quantiles()
            full = tuple(ft.tensors[name].shape)
            compared = full if full == tuple(base.tensors[name].shape) else (rows,) + full[1:]
            t = TensorDelta(name, layer_index(name), tensor_kind(name), compared, summary.stats(exact))
            report.tensors.append(t)
            layers[t.layer].add(summary)
            kinds[t.kind].add(summary)
            overall.add(summary)
        extra = [n for n in base.tensors if n not in ft.tensors]
        if extra:
            problems[(MISSING_TENSOR, f"the fine-tuned model {ft.path} has no tensor")].extend(extra)
    finally:
        ft.close()
        base.close()
    for (code, message), names in problems.items():
        if code == "note":
            report.diagnostics.append(Diagnostic(SHAPE, f"{_examples(names)}: {message}", severity="warning"))
        elif code in (SHAPE, DTYPE):  # a property of each tensor named: the names first
            report.diagnostics.append(Diagnostic(code, f"{_examples(names)}: {message}; not compared",
                                                 severity="warning"))
        else:
            report.diagnostics.append(Diagnostic(code, f"{message} {_examples(names)}; not compared",
                                                 severity="warning"))
    if not report.tensors:
        raise MergelangError(report.diagnostics + [Diagnostic(
            MISSING_TENSOR, f"no tensor of {ft.path} could be compared with {base.path}",
            help="pass a fine-tune and the base model it was trained from")])
    report.by_layer = {k: s.stats() for k, s in layers.items()}
    report.by_kind = {k: kinds[k].stats() for k in kinds}
    report.overall = overall.stats()
    return report


# ---- `check`: DARE on large deltas ------------------------------------------------------------------

SAMPLE_ROW_ELEMENTS = 4096  # at most this many elements of each sampled row (first and middle row)
_DROPS = {"dare": ("p", False), "keep_random": ("density", True), "magprune": ("density", True)}


def _drop_probability(node) -> float | None:
    """The drop probability of a random-drop node with a constant parameter, else None."""
    from .ops import OPS

    param, is_density = _DROPS[node.op]
    n_in, slots = OPS[node.op].layout(len(node.args))
    for p, s in slots:
        if p.name == param:
            arg = node.args[s.start]
            if arg.op != "const":
                return None
            value = float(arg.attr("value"))
            return 1.0 - value if is_density else value
    return None


def _sample(ft: Checkpoint, base: Checkpoint, names: list[tuple[str, str]]) -> tuple[np.ndarray, int]:
    """|δ| at a fixed set of places, and how many tensors they lie in: of each tensor kind, the
    tensors of the first, middle and last layer; of each, the first and middle row (at most its
    first SAMPLE_ROW_ELEMENTS entries). `names` are (ft tensor, base tensor) pairs: they differ
    where a stacked output reads other layers."""
    by_kind: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for pair in names:
        by_kind[tensor_kind(pair[0])].append(pair)
    parts, tensors = [], 0
    for group in by_kind.values():
        for name, base_name in dict.fromkeys([group[0], group[len(group) // 2], group[-1]]):
            a, b = ft.tensors[name], base.tensors[base_name]
            if len(a.shape) < 2:  # a vector is sampled as one row
                rows, row_size = 1, math.prod(a.shape)
            else:
                rows, row_size = min(a.shape[0], b.shape[0]), math.prod(a.shape[1:])
            tensors += 1
            for r in sorted({0, rows // 2}):
                start, stop = r * row_size, r * row_size + min(row_size, SAMPLE_ROW_ELEMENTS)
                parts.append(np.abs(ft.read_floats(name, start, stop) - base.read_floats(base_name, start, stop)))
    return (np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)), tensors


def dare_warnings(plan, reporter: Reporter) -> None:
    """Warn where a random drop of probability ≥ HIGH_DROP applies to `ft − base` (two loads) whose
    sampled p99 |δ| is at least LARGE_DELTA. Reads a few MB of weights in all."""
    from .graph import walk

    found: dict[tuple, dict] = {}
    for tp in plan.tensors:
        for node in walk(tp.graph):
            if node.op not in _DROPS or node.args[0].op != "sub":
                continue
            a, b = node.args[0].args
            if a.op != "load" or b.op != "load":
                continue
            p = _drop_probability(node)
            if p is None or p < HIGH_DROP:
                continue
            span = plan.lowered.spans.first(node)
            entry = found.setdefault((span, node.op, a.attr("model"), b.attr("model")), {"p": p, "names": []})
            entry["p"] = max(entry["p"], p)
            # In a stacked output a load reads another layer than the output tensor's (its `tensor`).
            entry["names"].append((a.attr("tensor") or tp.name, b.attr("tensor") or tp.name))
    samples: dict[tuple, tuple[np.ndarray, int]] = {}
    for (span, op, ft_key, base_key), entry in found.items():
        ft, base = plan.checkpoints[ft_key], plan.checkpoints[base_key]
        names = [(f, b) for f, b in dict.fromkeys(entry["names"])
                 if ft.tensors[f].shape[1:] == base.tensors[b].shape[1:]]
        key = (ft_key, base_key, tuple(names))
        if key not in samples:
            samples[key] = _sample(ft, base, names)
        sample, tensors = samples[key]
        if sample.size == 0:
            continue
        p99 = float(np.quantile(sample.astype(np.float64), VERDICT_QUANTILE))
        if level(p99) != "large":
            continue
        p = entry["p"]
        what = f"`dare` with p = {p:.3g}" if op == "dare" else f"a random drop with density {1 - p:.3g} (p = {p:.3g})"
        reporter.warn(
            DARE_LARGE_DELTA,
            f"{what} on `{ft_key} - {base_key}`, whose deltas are large: p99 |δ| ≈ {p99:.3g}, estimated "
            f"from a sample of {sample.size} entries in {tensors} tensor{'s' * (tensors != 1)}",
            span, label="drops most of a large delta",
            notes=(verdict(p99),),
            help=f"`mergelang stats {ft.path} {base.path}` measures every entry of the delta")
