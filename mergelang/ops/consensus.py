"""Combining task vectors: weighted sums and TIES's sign consensus (disjoint merge).

Both take the (sparsified) deltas of several models and one weight per model, and compute in
float32 in mergekit's order: each delta times its weight, then summed from the first model to
the last, then divided.
"""

from __future__ import annotations

import numpy as np

from ..lazy import torch
from . import native
from .fast import zero_unless, zero_unless_each
from .registry import KernelContext, Param, op

ZERO_SUM = 1e-8  # mergekit: a weight sum smaller than this in magnitude is not divided by


def _f32_sum(values: list[float]) -> float:
    """Σ values in float32, left to right (the divisor mergekit computes from float32 weights): each
    value rounded to float32, each sum too, as torch's float32 additions round them."""
    total = np.float32(values[0])
    for v in values[1:]:
        total = np.float32(total + np.float32(v))
    return float(total)


def _weights_check(params: dict) -> list[tuple[str, str]]:
    if params["normalize"] and abs(sum(params["weights"])) < ZERO_SUM:
        return [("weights", "must not sum to 0 when normalize=true (their sum is the divisor)")]
    return []


@op(
    "weighted_sum",
    None,
    (
        Param("weights", 1.0, kind="per_input", doc="one weight per input"),
        Param("normalize", False, kind="bool", doc="divide by the sum of the weights"),
    ),
    tensor_inputs=True,
    check_all=_weights_check,
)
def weighted_sum(ctx: KernelContext, *xs, weights: list[float], normalize: bool):
    """weighted_sum(x1, ..., xn, weights=[w1, ..., wn], normalize=false): Σ wᵢ·xᵢ, divided by Σ wᵢ
    when normalize (mergekit's linear, and task arithmetic's combination step). With normalize,
    weights summing to 0 are an error (mergekit's linear returns NaN/inf; its task arithmetic skips
    the division)."""
    total = xs[0] * weights[0]
    for x, w in zip(xs[1:], weights[1:]):
        total = total + x * w
    if normalize:
        divisor = torch.tensor(_f32_sum(weights), dtype=torch.float32, device=total.device)
        if divisor.abs().item() >= ZERO_SUM:
            total = total / divisor
    return total


@op(
    "disjoint_merge",
    None,
    (
        Param("weights", 1.0, kind="per_input", doc="one weight per input"),
        Param("normalize", True, kind="bool", doc="divide by the sum of the weights that agree"),
        Param("consensus_method", "sum", kind="choice", choices=("sum", "count"),
              doc="elect the sign by the sum of the weighted values, or by counting signs"),
    ),
    tensor_inputs=True,
)
def disjoint_merge(ctx: KernelContext, *xs, weights: list[float], normalize: bool, consensus_method: str):
    """disjoint_merge(x1, ..., xn, weights=[w1, ..., wn], normalize=true, consensus_method="sum"):
    TIES's elect-and-merge (Yadav et al. 2023), entry by entry. With dᵢ = wᵢ·xᵢ, the elected sign is
    s = +1 if Σ dᵢ >= 0 else -1 (consensus_method="count": if Σ sign(dᵢ) >= 0; ties go to +1). The
    result is Σ dᵢ over the i with sign(dᵢ) = s (zeros never agree), divided, when normalize, by the
    sum of those i's weights wᵢ (1 where none agree). With weights all 1 this is the paper's
    disjoint mean."""
    merged = native.disjoint_merge(xs, weights, normalize, consensus_method == "count")
    if merged is not None:
        return merged
    d = [x * w for x, w in zip(xs, weights)]
    if consensus_method == "sum":
        score = d[0]
        for v in d[1:]:
            score = score + v
    else:
        score = torch.sign(d[0])
        for v in d[1:]:
            score = score + torch.sign(v)
    elected = (score >= 0).to(score.dtype)  # 1 or 0, then +1 or -1 (exact): fewer passes than a select
    elected *= 2
    elected -= 1
    total = divisor = None
    for v, w in zip(d, weights):
        agree = torch.sign(v) == elected
        if normalize:
            term, share = zero_unless_each(agree, v, w)
            divisor = share if divisor is None else divisor + share
        else:
            term = zero_unless(agree, v)
        total = term if total is None else total + term
    if normalize:
        total = total / (divisor + (divisor == 0))  # a zero divisor (no agreement) becomes 1 exactly
    return total
