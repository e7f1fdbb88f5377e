"""Geometric primitives: norms, dot products and cosines (streamed statistics), interpolation along
great circles, a Karcher mean, and the scalar functions (sin, cos, acos, count) that the spherical
methods in stdlib/ (slerp, nuslerp, multislerp, karcher, model_stock) are written with. Selections
and bounds (`where`, `greater`, `ifelse`, `clamp`, `abs`) are in selection.py and sparsify.py.

Statistics are `reduce` ops: one pass over the chunks, products in float32 summed in float64 (so
the result does not depend on the chunk size), returned as float32. `over` says which vectors a
statistic is taken of:

- "tensor": the whole tensor as one vector; a 0-d result.
- "row": each vector along the last axis (each row of a matrix); shape (d0, ..., d_{k-1}, 1).
- "column": each vector along the first axis (each column of a matrix); one value per column,
  returned broadcast to the tensor's shape so that every chunk of rows can take its slice.

A tensor of one axis (or none) is a single vector for every `over`, as in mergekit.

Elementwise ops here accept Python numbers as well as tensors, so constant parameters fold.
"""

from __future__ import annotations

import math

from ..lazy import torch
from .registry import KernelContext, Param, in_range, op

OVER = ("tensor", "row", "column")
_over_doc = 'which vectors: "tensor" (whole), "row" (along the last axis) or "column" (along the first axis)'


def _over_param() -> Param:
    return Param("over", "tensor", kind="choice", choices=OVER, doc=_over_doc)


def _positive(v: float) -> str | None:
    return None if v > 0 else "must be > 0"


def _non_negative(v: float) -> str | None:
    return None if v >= 0 else "must be >= 0"


def _positive_int(v: float) -> str | None:
    return None if v == int(v) and v >= 1 else "must be a positive integer"


# ---- statistics ----------------------------------------------------------------------------------


class _Axis:
    """Float64 sums of products over the vectors that `over` names, chunk by chunk of rows."""

    def __init__(self, shape: tuple[int, ...], over: str):
        self.shape = tuple(shape)
        self.mode = over if len(self.shape) > 1 else "tensor"

    def start(self):
        return [] if self.mode == "row" else None

    def add(self, acc, product: torch.Tensor):
        if self.mode == "tensor":
            s = product.sum(dtype=torch.float64)
            return s if acc is None else acc + s
        if self.mode == "row":
            acc.append(product.sum(dim=-1, keepdim=True, dtype=torch.float64))
            return acc
        s = product.sum(dim=0, keepdim=True, dtype=torch.float64)
        return s if acc is None else acc + s

    def finish(self, acc, device) -> torch.Tensor:
        """The accumulated sums (float64), 0-d, row-shaped, or (1, ...) for columns."""
        if self.mode == "row":
            if not acc:
                return torch.zeros(self.shape[:-1] + (1,), dtype=torch.float64, device=device)
            return torch.cat(acc, dim=0)
        if acc is None:
            shape = () if self.mode == "tensor" else (1,) + self.shape[1:]
            return torch.zeros(shape, dtype=torch.float64, device=device)
        return acc

    def spread(self, stat: torch.Tensor) -> torch.Tensor:
        """A column statistic broadcast (without copying) to the tensor's shape."""
        return stat.expand(self.shape) if self.mode == "column" else stat


class _Stat:
    """A one-pass reducer: `products(chunks)` gives the float32 products to sum (in float64);
    `combine` turns the sums into the statistic."""

    def __init__(self, ctx: KernelContext, shape, *, over: str = "tensor", **params):
        self.ctx, self.axis, self.params = ctx, _Axis(shape, over), params
        self.acc: list = []

    def update(self, pass_: int, *chunks: torch.Tensor) -> None:
        for k, product in enumerate(self.products([c.to(torch.float32) for c in chunks])):
            if k == len(self.acc):
                self.acc.append(self.axis.start())
            self.acc[k] = self.axis.add(self.acc[k], product)

    def end_pass(self, pass_: int) -> bool:
        return True

    def result(self) -> torch.Tensor:
        sums = [self.axis.finish(a, self.ctx.device) for a in self.acc] if self.acc else None
        return self.axis.spread(self.combine(sums).to(torch.float32))

    def products(self, chunks: list[torch.Tensor]):
        """The float32 products to sum, one after another."""
        raise NotImplementedError

    def combine(self, sums: list[torch.Tensor] | None) -> torch.Tensor:
        raise NotImplementedError


@op("norm", 1, (_over_param(),), kind="reduce", tensor_inputs=True)
class Norm(_Stat):
    """norm(x, over="tensor"): the Euclidean norm sqrt(Σ x²) of the whole tensor, of each row
    (over="row") or of each column (over="column")."""

    def products(self, chunks):
        return [chunks[0] * chunks[0]]

    def combine(self, sums):
        return sums[0].sqrt() if sums else torch.zeros((), dtype=torch.float64)


@op("dot", 2, (_over_param(),), kind="reduce", tensor_inputs=True)
class Dot(_Stat):
    """dot(x, y, over="tensor"): the dot product Σ x·y of the whole tensors, of each row
    (over="row") or of each column (over="column")."""

    def products(self, chunks):
        return [chunks[0] * chunks[1]]

    def combine(self, sums):
        return sums[0] if sums else torch.zeros((), dtype=torch.float64)


GUARDS = ("product", "unit", "clamp")


@op(
    "cosine",
    None,
    (
        Param("eps", 1e-8, check=_non_negative, doc="guard against zero norms (see `guard`)"),
        Param("guard", "product", kind="choice", choices=GUARDS, doc="how eps guards a division by a norm"),
        _over_param(),
    ),
    kind="reduce",
    tensor_inputs=True,
)
class Cosine(_Stat):
    """cosine(x1, x2, ..., eps=1e-8, guard="product", over="tensor"): the cosine similarity
    cos_ij = clamp(Σ xi·xj / (|xi| |xj|), -1, 1) of two tensors (or rows, or columns); of more,
    the mean over all pairs i < j; of one, 1. All sums in one pass; the ratios in float64.

    `guard` keeps tiny norms from blowing up the ratio, each as one of mergekit's methods does:
    "product": divide by max(|xi| |xj|, eps) (model_stock); "unit": a norm <= eps counts as 1
    (slerp); "clamp": each norm counts as at least eps (nuslerp)."""

    def products(self, chunks):
        self.n = n = len(chunks)
        return (chunks[i] * chunks[j] for i in range(n) for j in range(i, n))

    def combine(self, sums):
        eps, guard = self.params["eps"], self.params["guard"]
        n = getattr(self, "n", 0)
        if n < 2:
            return torch.ones_like(sums[0]) if sums else torch.ones((), dtype=torch.float64)
        pairs = [(i, j) for i in range(n) for j in range(i, n)]
        sum_of = dict(zip(pairs, sums))
        norms = [sum_of[i, i].sqrt() for i in range(n)]
        if guard == "unit":
            norms = [torch.where(v > eps, v, torch.ones_like(v)) for v in norms]
        elif guard == "clamp":
            norms = [v.clamp(min=eps) for v in norms]
        total = None
        for i, j in pairs:
            if i == j:
                continue
            denom = norms[i] * norms[j]
            if guard == "product":
                denom = denom.clamp(min=eps)
            c = (sum_of[i, j] / denom).clamp(-1.0, 1.0)
            total = c if total is None else total + c
        return total / (n * (n - 1) // 2)


# ---- interpolation on spheres --------------------------------------------------------------------


def _tensor(x, like: torch.Tensor | None = None) -> torch.Tensor:
    if torch.is_tensor(x):
        return x
    device = like.device if like is not None else None
    return torch.tensor(float(x), dtype=torch.float32, device=device)


@op(
    "arc",
    3,
    (
        Param("t", check=in_range(0, 1), doc="position along the arc: 0 gives a, 1 gives b"),
        Param("lerp_above", 0.9995, check=in_range(0, 1), doc="interpolate linearly where |cos| > this"),
    ),
)
def arc(ctx: KernelContext, a, b, cos, *, t: float, lerp_above: float):
    """arc(a, b, cos, t, lerp_above=0.9995): spherical linear interpolation of a and b, whose
    cosine similarity is cos (a statistic: whole-tensor, per row or per column):
        θ = acos(cos),  result = sin((1-t)θ)/sin θ · a + sin(tθ)/sin θ · b,
    and (1-t)·a + t·b where |cos| > lerp_above (or |cos| = 1, where sin θ = 0). The coefficients are
    computed in float32 from cos, then applied to the chunk: exactly mergekit's order."""
    like = next((v for v in (a, b, cos) if torch.is_tensor(v)), None)
    c = _tensor(cos, like)
    t32 = torch.tensor(t, dtype=torch.float32, device=c.device)
    linear = (c.abs() > lerp_above) | (c.abs() >= 1)
    theta = torch.acos(torch.where(linear, torch.zeros_like(c), c))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(linear, 1 - t32, torch.sin((1 - t32) * theta) / sin_theta)
    coef_b = torch.where(linear, t32, torch.sin(t32 * theta) / sin_theta)
    return coef_a * a + coef_b * b


def _karcher_check(params: dict) -> list[tuple[str, str]]:
    weights = params.get("weight") or []
    if weights and sum(weights) == 0:
        return [("weight", "must not sum to 0")]
    return []


@op(
    "karcher_mean",
    None,
    (
        Param("weight", 1.0, kind="per_input", check=_non_negative, doc="relative weight of each input"),
        Param("max_iter", 10, kind="int", check=_positive_int, doc="most iterations of the mean"),
        Param("tol", 1e-5, check=_positive, doc="convergence and zero-norm tolerance"),
    ),
    kind="tensor",
    tensor_inputs=True,
    check_all=_karcher_check,
)
def karcher_mean(ctx: KernelContext, *xs, weight: list[float], max_iter: int, tol: float):
    """karcher_mean(x1, x2, ..., weight=1, max_iter=10, tol=1e-5): the weighted Karcher (Riemannian)
    mean of the inputs' directions on the unit sphere, scaled by their weighted mean norm
    (α_i = weight_i / Σ weight). With u_i = x_i/|x_i| for the inputs with |x_i| > tol, and m the
    normalized Σ α_i u_i (renormalized over those inputs), it iterates at most max_iter times
        v = Σ α_i θ_i/sin θ_i (u_i - cos θ_i m),  θ_i = acos(m·u_i)  (terms with θ_i < tol skipped)
        m ← cos|v| m + sin|v| v/|v|,  then m ← m/|m|,
    stopping once |v| < tol; the result is (Σ α_i |x_i|) m. One input is returned unchanged.
    A `tensor` op: the iterations need whole tensors. Float32, in mergekit's order of operations."""
    if len(xs) == 1:
        return xs[0]
    total = sum(weight)
    alphas = [w / total for w in weight]
    flat = [x.reshape(-1) for x in xs]
    norms = [torch.linalg.vector_norm(x) for x in flat]
    units = [torch.zeros_like(x) if n.item() == 0.0 else x / n for x, n in zip(flat, norms)]
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    if not valid:
        result = flat[0] * 0
        for x in flat[1:]:
            result = result + x * 0
        return result.view(xs[0].shape)
    alpha_sum = sum(alphas[i] for i in valid)
    a = [alphas[i] / alpha_sum for i in valid]
    u = [units[i] for i in valid]
    mean = torch.zeros_like(u[0])
    for alpha, unit in zip(a, u):
        mean += alpha * unit
    mean_norm = torch.linalg.vector_norm(mean)
    mean = u[0].clone() if mean_norm.item() < tol else mean / mean_norm
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for alpha, unit in zip(a, u):
            d = torch.clamp(torch.dot(mean, unit), -1.0, 1.0)
            theta = torch.arccos(d)
            if theta.item() < tol:
                continue
            tangent += alpha * (theta / torch.sin(theta)) * (unit - d * mean)
        tangent_norm = torch.linalg.vector_norm(tangent)
        if tangent_norm.item() < tol:
            break
        mean = torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)
        unit_norm = torch.linalg.vector_norm(mean)
        if unit_norm.item() > tol:
            mean = mean / unit_norm
    scale = None
    for alpha, n in zip(alphas, norms):
        scale = alpha * n if scale is None else scale + alpha * n
    return (scale * mean).view(xs[0].shape)


# ---- scalar functions and selections -------------------------------------------------------------


def _unary(name: str, scalar, formula: str):
    """Op `name`: scalar(x) on a number, torch's function of the same name on a tensor."""

    def kernel(ctx: KernelContext, x):
        if torch.is_tensor(x):
            return getattr(torch, name)(x)
        try:
            return scalar(float(x))
        except ValueError:
            return math.nan

    kernel.__doc__ = formula
    kernel.__name__ = name
    op(name, 1)(kernel)
    return kernel


sin = _unary("sin", math.sin, "sin(x): the sine of x (radians), elementwise.")
cos = _unary("cos", math.cos, "cos(x): the cosine of x (radians), elementwise.")
acos = _unary("acos", math.acos, "acos(x): the arc cosine of x, in [0, π], elementwise (NaN outside [-1, 1]).")


@op("count", None)
def count(ctx: KernelContext, *xs):
    """count(x1, x2, ...) or count([x1, ...]): the number of values, n."""
    return float(len(xs))
