"""The geometric methods (slerp, nuslerp, multislerp, karcher, model_stock, nearswap, passthrough)
and their primitives: hand-computed 2x3 tensors, mergekit on tiny Llamas, `mergelang check`
diagnostics, and properties (hypothesis)."""

from __future__ import annotations

import functools
import math
import re

import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from oracle import assert_close_ulp, make_family, require_mergekit, run_mergekit, run_mergelang, run_tensors
from mergelang.check import TensorPlan
from mergelang.cli import main
from mergelang.demo import TINY_LLAMA
from mergelang.execute import ExecOptions, evaluate_in_memory
from mergelang.lower import lower
from mergelang.ops import OPS, KernelContext
from mergelang.optimize import optimize
from mergelang.parse import parse
from mergelang.specialize import LayerInfo, specialize

S2 = 0.70710677  # sin(π/4) = √2/2 in float32


def _header(names) -> str:
    return "".join(f'{k} = model("{k}")\n' for k in names)


def hand(tmp_path, expr: str, **models: torch.Tensor) -> torch.Tensor:
    """Run `output expr` through `mergelang run` on one tensor `w` per model, in float32."""
    out = run_tensors(_header(models) + f"output {expr}\n", {k: {"w": v} for k, v in models.items()}, tmp_path)
    return out["w"]


@functools.lru_cache(maxsize=None)
def _graph(text: str):
    lowered = lower(parse(text))
    return optimize(specialize(lowered.output, "w", LayerInfo(0), lowered.spans), lowered.spans)


def evaluate(expr: str, *, chunk: int = 1 << 20, **models: torch.Tensor) -> torch.Tensor:
    """The same, in memory: lower, specialize, optimize and evaluate through the chunked executor."""
    graph = _graph(_header(models) + f"output {expr}\n")
    shape = tuple(next(iter(models.values())).shape)
    return evaluate_in_memory(TensorPlan("w", graph, shape, "F32"), models, ExecOptions(chunk=chunk))


def close(got: torch.Tensor, expected) -> None:
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float32), rtol=1e-6, atol=1e-7)


def T(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def V(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# ---- primitives --------------------------------------------------------------------------------


def test_statistics_over_tensor_rows_and_columns():
    x = T([3.0, 4.0, 0.0], [0.0, 0.0, 12.0])
    y = T([1.0, 0.0, 0.0], [0.0, 2.0, 0.0])
    assert evaluate("norm(x) * (x * 0 + 1)", x=x).flatten()[0].item() == 13.0
    close(evaluate("norm(x, over=\"row\") * (x * 0 + 1)", x=x), [[5, 5, 5], [12, 12, 12]])
    close(evaluate("norm(x, over=\"column\") * (x * 0 + 1)", x=x), [[3, 4, 12], [3, 4, 12]])
    close(evaluate("dot(x, y, over=\"row\") * (x * 0 + 1)", x=x, y=y), [[3, 3, 3], [0, 0, 0]])
    close(evaluate("dot(x, y, over=\"column\") * (x * 0 + 1)", x=x, y=y), [[3, 0, 0], [3, 0, 0]])
    # cos(x, y) = 3 / (13 · √5); per row: 3/5 and 0; per column: 1, 0, 0 (a zero norm gives 0).
    close(evaluate("cosine(x, y) * (x * 0 + 1)", x=x, y=y), [[0.10320314] * 3] * 2)
    close(evaluate("cosine(x, y, over=\"row\") * (x * 0 + 1)", x=x, y=y), [[0.6] * 3, [0.0] * 3])
    close(evaluate("cosine(x, y, over=\"column\") * (x * 0 + 1)", x=x, y=y), [[1, 0, 0], [1, 0, 0]])


def test_cosine_of_several_is_the_mean_over_pairs_and_of_one_is_one():
    a, b, c = V(1.0, 0.0), V(1.0, 1.0), V(0.0, 1.0)
    # pairs: cos(a, b) = √2/2, cos(a, c) = 0, cos(b, c) = √2/2 → mean √2/3
    close(evaluate("cosine(a, b, c) * (a * 0 + 1)", a=a, b=b, c=c), [0.47140452] * 2)
    close(evaluate("cosine([a]) * (a * 0 + 1)", a=a), [1.0, 1.0])


def test_cosine_guards_follow_each_mergekit_method():
    """A tiny x (|x| = 1e-7) against y = x direction · 10: the true cosine is 1."""
    cos = OPS["cosine"].kernel
    x, y = V(1e-7, 0.0), V(10.0, 0.0)

    def run(eps, guard):
        r = cos(KernelContext(), (2,), eps=eps, guard=guard, over="tensor")
        r.update(0, x, y)
        r.end_pass(0)
        return r.result().item()

    assert run(1e-8, "unit") == pytest.approx(1.0)  # norms above eps are used as they are
    assert run(1e-6, "unit") == pytest.approx(1e-7)  # slerp: a norm <= eps counts as 1
    assert run(1e-6, "clamp") == pytest.approx(0.1)  # nuslerp: a norm counts as at least eps
    assert run(1e-5, "product") == pytest.approx(0.1)  # model_stock: max(|x||y|, eps) = 1e-5


def test_arc_coefficients_and_linear_fallback():
    arc = OPS["arc"].kernel
    a, b = V(1.0, 0.0), V(0.0, 1.0)
    close(arc(KernelContext(), a, b, torch.tensor(0.0), t=0.5, lerp_above=0.9995), [S2, S2])
    close(arc(KernelContext(), a, b, torch.tensor(0.5), t=0.5, lerp_above=0.9995), [0.57735026] * 2)  # θ = π/3
    close(arc(KernelContext(), a, b, torch.tensor(0.9996), t=0.25, lerp_above=0.9995), [0.75, 0.25])
    # |cos| = 1 is linear whatever lerp_above says (sin θ = 0 there).
    close(arc(KernelContext(), a, b, torch.tensor(-1.0), t=0.25, lerp_above=1.0), [0.75, 0.25])


def test_scalar_functions_fold_and_apply_elementwise():
    assert OPS["acos"].kernel(KernelContext(), 2.0) != OPS["acos"].kernel(KernelContext(), 2.0)  # NaN
    assert OPS["sin"].kernel(KernelContext(), math.pi / 2) == 1.0
    assert OPS["count"].kernel(KernelContext(), 1.0, 2.0, 3.0) == 3.0
    close(evaluate("cos(x) + sin(x) + acos(x * 0)", x=V(0.0, math.pi)), [1 + math.pi / 2, -1 + math.pi / 2])


# ---- hand-computed merges on 2x3 tensors ---------------------------------------------------------


def test_slerp_hand(tmp_path):
    a, b = T([2.0, 0.0, 0.0], [0.0, 0.0, 0.0]), T([0.0, 0.0, 0.0], [0.0, 0.0, 3.0])
    # Orthogonal: θ = π/2, coefficients sin((1-t)π/2) and sin(tπ/2).
    close(hand(tmp_path / "half", "slerp(a, b, t=0.5)", a=a, b=b), [[2 * S2, 0, 0], [0, 0, 3 * S2]])
    close(hand(tmp_path / "third", "slerp(a, b, t=1 / 3)", a=a, b=b), [[2 * 0.8660254, 0, 0], [0, 0, 1.5]])
    # Parallel (cos = 1 > 0.9995): linear, (1 - t)·a + t·2a.
    c = T([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    close(hand(tmp_path / "lin", "slerp(c, 2 * c, t=0.25)", c=c), [[1.25, 2.5, 3.75], [5, 6.25, 7.5]])


def test_nuslerp_hand(tmp_path):
    a, b = T([1.0, 0.0, 0.0], [0.0, 2.0, 0.0]), T([0.0, 1.0, 0.0], [0.0, 2.0, 0.0])
    # Whole tensors: cos θ = 4/5, coefficient sin(θ/2)/sin θ = 1/(2 cos(θ/2)) = 1/(2√0.9) on a + b.
    k = 1 / (2 * math.sqrt(0.9))
    close(hand(tmp_path / "flat", "nuslerp([a, b], weights=[1, 1])", a=a, b=b), [[k, k, 0], [0, 4 * k, 0]])
    # Rows: row 0 orthogonal (√2/2 each), row 1 parallel (linear).
    close(hand(tmp_path / "rows", "nuslerp([a, b], weights=[1, 1], nuslerp_flatten=false)", a=a, b=b),
          [[S2, S2, 0], [0, 2, 0]])
    # Columns (nuslerp_row_wise=true): column 0 against a zero column (cos 0), column 1
    # (0, 2) vs (1, 2) with cos = 2/√5, column 2 all zero.
    k1 = 1 / (2 * math.sqrt((1 + 2 / math.sqrt(5)) / 2))
    close(hand(tmp_path / "cols", "nuslerp([a, b], weights=[1, 1], nuslerp_flatten=false, nuslerp_row_wise=true)",
               a=a, b=b), [[S2, k1, 0], [0, 4 * k1, 0]])
    # With a base: the task vectors a - base and b - base are interpolated (t = 3/4 here: the
    # orthogonal rows give sin(π/8) and sin(3π/8)), then added back.
    base = T([1.0, 1.0, 1.0], [1.0, 1.0, 1.0])
    close(hand(tmp_path / "base", "nuslerp([a + base, b + base], weights=[1, 3], base=base, nuslerp_flatten=false)",
               a=a, b=b, base=base), [[1 + 0.38268343, 1 + 0.9238795, 1], [1, 3, 1]])
    # Weights summing to 0: t = 0.5.
    close(hand(tmp_path / "zero", "nuslerp([a, b], weights=[1, -1], nuslerp_flatten=false)", a=a, b=b),
          [[S2, S2, 0], [0, 2, 0]])


def test_multislerp_hand(tmp_path):
    a, b = T([2.0, 0.0, 0.0], [0.0, 0.0, 0.0]), T([0.0, 0.0, 0.0], [0.0, 0.0, 4.0])
    # Directions e1, e6 with equal weights: mean direction (e1 + e6)/√2, mean norm 3.
    close(hand(tmp_path / "eq", "multislerp([a, b], weights=[1, 1])", a=a, b=b), [[3 * S2, 0, 0], [0, 0, 3 * S2]])
    # Weights 1:3: direction (1, 3)/√10, norm (2 + 3·4)/4 = 3.5.
    close(hand(tmp_path / "13", "multislerp([a, b], weights=[1, 3])", a=a, b=b),
          [[3.5 / math.sqrt(10), 0, 0], [0, 0, 3.5 * 3 / math.sqrt(10)]])
    # normalize_weights=false: the norm is 1·2 + 3·4 = 14.
    close(hand(tmp_path / "raw", "multislerp([a, b], weights=[1, 3], normalize_weights=false)", a=a, b=b),
          [[14 / math.sqrt(10), 0, 0], [0, 0, 14 * 3 / math.sqrt(10)]])
    # Opposite directions cancel: the weighted sum 0.5·2 + 0.5·(-4) = -1 (mergekit does this for two
    # models and raises for more; here any number falls back the same way).
    c = T([-4.0, 0.0, 0.0], [0.0, 0.0, 0.0])
    close(hand(tmp_path / "cancel", "multislerp([a, c], weights=[1, 1])", a=a, c=c), [[-1, 0, 0], [0, 0, 0]])
    close(hand(tmp_path / "cancel3", "multislerp([a, c, b], weights=[1, 1, 0])", a=a, b=b, c=c),
          [[-1, 0, 0], [0, 0, 0]])
    # With a base: the task vectors are interpolated and added back.
    base = T([1.0, 1.0, 1.0], [1.0, 1.0, 1.0])
    close(hand(tmp_path / "base", "multislerp([a + base, b + base], weights=[1, 1], base=base)", a=a, b=b, base=base),
          [[1 + 3 * S2, 1, 1], [1, 1, 1 + 3 * S2]])


def test_karcher_hand(tmp_path):
    e1, e2 = T([1.0, 0.0, 0.0], [0.0, 0.0, 0.0]), T([0.0, 1.0, 0.0], [0.0, 0.0, 0.0])
    # Two orthogonal directions with norms 2 and 4: the midpoint of the arc, times the mean norm 3.
    close(hand(tmp_path / "two", "karcher([2 * e1, 4 * e2])", e1=e1, e2=e2), [[3 * S2, 3 * S2, 0], [0, 0, 0]])
    # e1 twice and e2 once: the weighted mean angle, 30° from e1 (the Euclidean mean is at 26.6°).
    close(hand(tmp_path / "three", "karcher([e1, e1, e2])", e1=e1, e2=e2), [[0.8660254, 0.5, 0], [0, 0, 0]])


def test_model_stock_hand(tmp_path):
    base = T([1.0, 1.0, 1.0], [1.0, 1.0, 1.0])
    m1 = base + T([1.0, 0.0, 0.0], [0.0, 0.0, 1.0])
    m2 = base + T([1.0, 1.0, 0.0], [0.0, 0.0, -1.0])
    # Whole tensors: the offsets are orthogonal (1 - 1 = 0), so t = 0 and the base is kept.
    close(hand(tmp_path / "flat", "model_stock(base, [m1, m2])", base=base, m1=m1, m2=m2), [[1, 1, 1], [1, 1, 1]])
    # Per row: row 0 has cos = √2/2, t = 2c/(1 + c) = 2(√2 - 1), and avg - base = (1, 0.5, 0);
    # row 1 has cos = -1, so 1 + (n-1)c = 0 and the base row is kept.
    t = 2 * (math.sqrt(2) - 1)
    close(hand(tmp_path / "rows", "model_stock(base, [m1, m2], filter_wise=true)", base=base, m1=m1, m2=m2),
          [[1 + t, 1 + t / 2, 1], [1, 1, 1]])


def test_nearswap_hand(tmp_path):
    base = T([1.0, 1.0, 1.0], [1.0, 1.0, 1.0])
    other = base + T([0.001, 0.01, 1.0], [-0.002, 0.0, 2.0])
    # w = clamp(0.002 / max(|diff|, 1e-6), 0, 1) = (1, 0.2, 0.002, 1, 1, 0.001); base + w·diff.
    got = hand(tmp_path, "nearswap(base, other, t=0.002)", base=base, other=other)
    torch.testing.assert_close(got, T([1.001, 1.002, 1.002], [0.998, 1.0, 1.002]), rtol=1e-6, atol=1e-6)


def test_passthrough_hand(tmp_path):
    x = T([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    assert torch.equal(hand(tmp_path / "one", "passthrough(x)", x=x), x)
    close(hand(tmp_path / "half", "passthrough(x, scale=0.5)", x=x), [[0.5, 1, 1.5], [2, 2.5, 3]])


# ---- against mergekit on tiny Llamas -------------------------------------------------------------

HEAD = 'base = model("base")\nft0 = model("ft0")\nft1 = model("ft1")\nft2 = model("ft2")\n'


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    """base and ft0..ft2, five layers (so per-layer gradients have room to vary)."""
    return make_family(tmp_path_factory.mktemp("geometry"), 3, config={**TINY_LLAMA, "num_hidden_layers": 5})


def _config(root, method: str, models: list[str], base: str | None = None, per_model: str | None = None,
            values: list | None = None, **parameters) -> dict:
    """A mergekit config: `per_model` names the parameter that `values` give one per model."""
    entries = [{"model": str(root / m), **({"parameters": {per_model: v}} if per_model else {})}
               for m, v in zip(models, values or [None] * len(models))]
    config = {"merge_method": method, "models": entries, "parameters": parameters}
    if base:
        config["base_model"] = str(root / base)
    return config


FT3 = ["ft0", "ft1", "ft2"]
SLERP_FILTERS = [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                 {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
                 {"value": 0.5}]
ORACLE = {  # case: (mergekit config arguments, mergelang formula)
    "slerp": (dict(method="slerp", models=["ft0"], base="base", t=0.3), "slerp(base, ft0, t=0.3)"),
    "slerp_fine_tunes": (dict(method="slerp", models=["ft1"], base="ft0", t=0.7), "slerp(ft0, ft1, t=0.7)"),
    "slerp_gradient": (dict(method="slerp", models=["ft1"], base="ft0", t=[0, 0.5, 1]),
                       "slerp(ft0, ft1, t=layers(0, 0.5, 1))"),
    "slerp_filters": (dict(method="slerp", models=["ft1"], base="ft0", t=SLERP_FILTERS),
                      'slerp(ft0, ft1, t=match tensor { "self_attn" => layers(0, 0.5, 0.3, 0.7, 1), '
                      '"mlp" => layers(1, 0.5, 0.7, 0.3, 0), _ => 0.5 })'),
    "nuslerp": (dict(method="nuslerp", models=["ft0", "ft1"], base="base", per_model="weight", values=[0.3, 0.5]),
                "nuslerp([ft0, ft1], weights=[0.3, 0.5], base=base)"),
    "nuslerp_no_base": (dict(method="nuslerp", models=["ft0", "ft1"], per_model="weight", values=[0.3, 0.5]),
                        "nuslerp([ft0, ft1], weights=[0.3, 0.5])"),
    "nuslerp_rows": (dict(method="nuslerp", models=["ft0", "ft1"], base="base", per_model="weight",
                          values=[0.6, 0.2], nuslerp_flatten=False),
                     "nuslerp([ft0, ft1], weights=[0.6, 0.2], base=base, nuslerp_flatten=false)"),
    "nuslerp_columns": (dict(method="nuslerp", models=["ft0", "ft1"], base="base", per_model="weight",
                             values=[0.6, 0.2], nuslerp_flatten=False, nuslerp_row_wise=True),
                        "nuslerp([ft0, ft1], weights=[0.6, 0.2], base=base, nuslerp_flatten=false, "
                        "nuslerp_row_wise=true)"),
    "multislerp": (dict(method="multislerp", models=FT3, base="base", per_model="weight", values=[0.2, 0.3, 0.5]),
                   "multislerp([ft0, ft1, ft2], weights=[0.2, 0.3, 0.5], base=base)"),
    "multislerp_raw": (dict(method="multislerp", models=FT3, per_model="weight", values=[1, 2, 3],
                            normalize_weights=False),
                       "multislerp([ft0, ft1, ft2], weights=[1, 2, 3], normalize_weights=false)"),
    "karcher": (dict(method="karcher", models=FT3), "karcher([ft0, ft1, ft2])"),
    "karcher_four": (dict(method="karcher", models=["base"] + FT3, max_iter=3),
                     "karcher([base, ft0, ft1, ft2], max_iter=3)"),
    "model_stock": (dict(method="model_stock", models=FT3, base="base"), "model_stock(base, [ft0, ft1, ft2])"),
    "model_stock_filter_wise": (dict(method="model_stock", models=FT3, base="base", filter_wise=True),
                                "model_stock(base, [ft0, ft1, ft2], filter_wise=true)"),
    "nearswap": (dict(method="nearswap", models=["ft0"], base="base", t=0.003), "nearswap(base, ft0, t=0.003)"),
    "passthrough": (dict(method="passthrough", models=["ft0"], per_model="scale", values=[0.5]),
                    "passthrough(ft0, scale=0.5)"),
}


@pytest.mark.parametrize("case", list(ORACLE))
def test_matches_mergekit(case, llamas, tmp_path):
    """Every tensor within 1 bf16 ulp of mergekit's (both compute in float32; no ties are possible)."""
    require_mergekit()
    arguments, formula = ORACLE[case]
    theirs = run_mergekit(_config(llamas, **arguments), tmp_path / "mergekit")
    ours = run_mergelang(HEAD + f"output {formula}\n", llamas, tmp_path / "mergelang")
    assert_close_ulp(ours, theirs)


def test_per_tensor_t_changes_the_result(llamas, tmp_path):
    """The gradient and filter cases above are not passing by accident: a constant t differs."""
    grad = run_mergelang(HEAD + "output slerp(ft0, ft1, t=layers(0, 0.5, 1))\n", llamas, tmp_path / "g")
    flat = run_mergelang(HEAD + "output slerp(ft0, ft1, t=0.5)\n", llamas, tmp_path / "f")
    differ = [k for k in grad if not torch.equal(grad[k], flat[k])]
    assert any(".layers.0." in k for k in differ) and any(".layers.4." in k for k in differ)
    assert not any(".layers.2." in k for k in differ)  # the middle layer has t = 0.5 too


# ---- `mergelang check` diagnostics ---------------------------------------------------------------


def check(folder, formula: str) -> str:
    path = folder / "check.ml"
    path.write_text(HEAD + f"output {formula}\n")
    result = CliRunner().invoke(main, ["check", str(path)])
    assert result.exit_code == 1, result.output
    return result.output


LOCATION = re.compile(r"--> \S+\.ml:\d+:\d+")


@pytest.mark.parametrize("formula, message", [
    ("slerp(base, ft0, tt=0.5)", "error[E004]: `slerp` has no parameter `tt`"),
    ("nuslerp([ft0, ft1], weights=[1, 1], flatten=false)", "`nuslerp` has no parameter `flatten`"),
    ("model_stock(base, [ft0, ft1], filterwise=true)", "`model_stock` has no parameter `filterwise`"),
    ("karcher([ft0, ft1], iterations=3)", "`karcher` has no parameter `iterations`"),
    ("nearswap(base, ft0, T=0.1)", "`nearswap` has no parameter `T`"),
    ("passthrough(ft0, weight=2)", "`passthrough` has no parameter `weight`"),
    ("multislerp([ft0, ft1], weights=[1, 1], normalize=true)", "`multislerp` has no parameter `normalize`"),
    ("slerp(base, ft0, t=1.5)", "error[E006]: `t` of `arc` must be in [0, 1], got 1.5"),
    ("slerp(base, ft0, t=-0.1)", "error[E006]: `t` of `arc` must be in [0, 1], got -0.1"),
    ("slerp(base, ft0, t=layers(0, 2))", "`t` of `arc` must be in [0, 1], got 2 (for `model.layers.4."),
    ("karcher([ft0, ft1], max_iter=0)", "`max_iter` of `karcher_mean` must be a positive integer, got 0"),
    ("karcher([ft0, ft1], tol=0)", "`tol` of `karcher_mean` must be > 0, got 0"),
    ("multislerp([ft0, ft1], weights=[1, 2, 3])", "error[E013]: lists of different lengths"),
    ("nuslerp([ft0, ft1, ft2], weights=[1, 1, 1])", "error[E013]: lists of different lengths"),
    ("nuslerp([ft0, ft1], weights=[1, 1, 1])", "error[E013]: lists of different lengths"),
    ("multislerp([ft0, ft1], weights=[1, -1])", "division by zero"),
    ("model_stock(base, [ft0, ft1], filter_wise=1)", "must be true or false, found a number"),
])
def test_check_rejects(formula, message, llamas):
    output = check(llamas, formula)
    assert message in output
    assert LOCATION.search(output), output


def test_range_error_points_at_the_callers_argument(llamas):
    output = check(llamas, "slerp(base, ft0, t=1.5)")
    assert "check.ml:5:" in output


# ---- properties ----------------------------------------------------------------------------------

_values = st.floats(-8, 8, allow_nan=False, width=32)


@st.composite
def _tensors(draw, count: int):
    rows, cols = draw(st.integers(1, 4)), draw(st.integers(1, 5))
    return [torch.tensor(draw(st.lists(_values, min_size=rows * cols, max_size=rows * cols)),
                         dtype=torch.float32).view(rows, cols) for _ in range(count)]


FAST = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(_tensors(2))
def test_slerp_endpoints(ab):
    a, b = ab
    assert torch.equal(evaluate("slerp(a, b, t=0)", a=a, b=b), a)
    assert torch.equal(evaluate("slerp(a, b, t=1)", a=a, b=b), b)


@FAST
@given(_tensors(2), st.floats(0.1, 10))
def test_multislerp_and_karcher_of_one_model(xs, weight):
    x, base = xs
    assert torch.equal(evaluate("karcher([x])", x=x), x)
    tol = dict(rtol=1e-6, atol=1e-6 * (1 + x.abs().max().item()))
    torch.testing.assert_close(evaluate(f"multislerp([x], weights=[{weight!r}])", x=x), x, **tol)
    tol["atol"] *= 1 + base.abs().max().item()
    torch.testing.assert_close(evaluate(f"multislerp([x], weights=[{weight!r}], base=base)", x=x, base=base), x, **tol)


@FAST
@given(_tensors(2), st.integers(2, 4), st.booleans())
def test_model_stock_of_identical_fine_tunes(xs, n, filter_wise):
    base, delta = xs
    delta = torch.where(delta.abs() < 0.5, torch.full_like(delta, 0.5), delta)  # offsets well above eps
    ft = base + delta
    models = {f"m{i}": ft.clone() for i in range(n)}
    fw = "true" if filter_wise else "false"
    got = evaluate(f"model_stock(base, [{', '.join(models)}], filter_wise={fw})", base=base, **models)
    torch.testing.assert_close(got, ft, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("chunk", [1, 3, 7, 64])
def test_statistics_do_not_depend_on_chunk_size(chunk):
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(37, 11, generator=g) for _ in range(3))
    for expr in ["slerp(a, b, t=0.3)",
                 "nuslerp([a, b], weights=[1, 2], nuslerp_flatten=false)",
                 "nuslerp([a, b], weights=[1, 2], nuslerp_flatten=false, nuslerp_row_wise=true)",
                 "multislerp([a, b, c], weights=[1, 2, 3])",
                 "model_stock(c, [a, b], filter_wise=true)",
                 "model_stock(c, [a, b])"]:
        whole = evaluate(expr, a=a, b=b, c=c)
        assert torch.equal(evaluate(expr, chunk=chunk * 11, a=a, b=b, c=c), whole), expr
