"""The task-arithmetic family (linear, task_arithmetic, ties, dare_*, breadcrumbs*, della*): hand-computed
2×3 tensors, mergekit on tiny Llamas, and `mergelang check` diagnostics."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from oracle import (
    assert_close_ulp, load_folder, make_family, require_mergekit, run_mergekit, run_mergelang, run_tensors, ulp_diff,
)
from mergelang.cli import main
from mergelang.check import TensorPlan
from mergelang.demo import make_tiny_llama
from mergelang.execute import ExecOptions, evaluate_in_memory
from mergelang.graph import Node, const, with_random_key
from mergelang.ops import OPS, KernelContext
from mergelang.ops.select import band_counts, topk_count
from mergelang.ops.sparsify import magprune_probabilities

# ---- hand-computed: base = 1, three deltas of exact binary fractions ----------------------------------

BASE = torch.ones(2, 3)
D0 = torch.tensor([[0.5, -0.25, 0.125], [1.0, 0.0, -2.0]])
D1 = torch.tensor([[-0.5, 0.5, 0.25], [0.25, 0.75, 1.0]])
D2 = torch.tensor([[0.25, -1.0, -0.5], [-0.75, 0.5, 0.125]])
MODELS = {"base": {"w": BASE}, "m0": {"w": BASE + D0}, "m1": {"w": BASE + D1}, "m2": {"w": BASE + D2}}
ALL = "base, [m0, m1, m2], weights=[1, 1, 2]"

# Worked by hand (weights 1, 1, 2; flat index order e0..e5):
# - trim to density 0.5 keeps 3 of 6 per model, equal magnitudes to the lower index:
#   d0 → [0.5, 0, 0, 1, 0, -2];  d1 → [-0.5, 0, 0, 0, 0.75, 1] (0.5 at e0 beats 0.5 at e1);
#   d2 → [0, -1, -0.5, -0.75, 0, 0] (0.5 at e2 beats 0.5 at e4).
# - weighted: D0 = d0, D1 = d1, D2 = 2·d2 = [0, -2, -1, -1.5, 0, 0]; sums [0, -2, -1, -0.5, 0.75, -1]
#   elect + - - - + - (a zero sum elects +); agreeing entries and weights:
#   e0: 0.5/1, e1: -2/2, e2: -1/2, e3: -1.5/2, e4: 0.75/1, e5: -2/1.
# - breadcrumbs, density 0.5, gamma 0.2: k = 3, g = min(int(1.2), 3) = 1, ranks 2..4 kept:
#   d0 → [0.5, -0.25, 0, 1, 0, 0];  d1 → [-0.5, 0.5, 0, 0, 0.75, 0];  d2 → [0, 0, -0.5, -0.75, 0.5, 0].
HAND = {
    "linear": ("linear([m0, m1, m2], weights=[1, 1, 2])",  # (m0 + m1 + 2·m2) / 4
               [[1.125, 0.5625, 0.84375], [0.9375, 1.4375, 0.8125]]),
    "linear_unnormalized": ("linear([m0, m1, m2], weights=[1, 1, 2], normalize=false)",
                            [[4.5, 2.25, 3.375], [3.75, 5.75, 3.25]]),
    "task_arithmetic": (f"task_arithmetic({ALL}, lambda=0.5)",  # 1 + 0.5·(d0 + d1 + 2·d2)
                        [[1.25, 0.125, 0.6875], [0.875, 1.875, 0.625]]),
    "task_arithmetic_positional": ("task_arithmetic(base, [m0, m1, m2], [1, 1, 2], 0.5)",
                                   [[1.25, 0.125, 0.6875], [0.875, 1.875, 0.625]]),
    "task_arithmetic_normalized": (f"task_arithmetic({ALL}, normalize=true)",  # 1 + (d0 + d1 + 2·d2) / 4
                                   [[1.125, 0.5625, 0.84375], [0.9375, 1.4375, 0.8125]]),
    "ties": (f"ties({ALL}, density=0.5)",
             [[1.5, 0.0, 0.5], [0.25, 1.75, -1.0]]),
    "ties_unnormalized": (f"ties({ALL}, density=0.5, normalize=false)",
                          [[1.5, -1.0, 0.0], [-0.5, 1.75, -1.0]]),
    # count: sign sums [0, -1, -1, 0, +1, 0] elect + - - + + +; e3: D0 = 1 alone, e5: D1 = 1 alone
    "ties_count": (f'ties({ALL}, density=0.5, consensus_method="count")',
                   [[1.5, 0.0, 0.5], [2.0, 1.75, 2.0]]),
    # density 1: sums of the full weighted deltas [0.5, -1.75, -0.625, -0.25, 1.75, -0.75]
    # elect + - - - + -; e0: (0.5 + 0.5)/3, e1: (-0.25 - 2)/3, e4: (0.75 + 1)/3
    "ties_dense": (f"ties({ALL})",
                   [[1 + 1 / 3, 0.25, 0.5], [0.25, 1 + 1.75 / 3, -1.0]]),
    "breadcrumbs": (f"breadcrumbs({ALL}, density=0.5, gamma=0.2)",  # 1 + d0 + d1 + 2·d2 of the bands
                    [[1.0, 1.25, 0.0], [0.5, 2.75, 1.0]]),
    # signs of the band sums [0, 0.25, -1, -0.5, 1.75, 0]: + + - - + +; not normalized (the default)
    "breadcrumbs_ties": (f"breadcrumbs_ties({ALL}, density=0.5, gamma=0.2)",
                         [[1.5, 1.5, 0.0], [-0.5, 2.75, 1.0]]),
    # gamma·n = 0.06 rounds to no outlier cut: the top 3 of d0 (mergekit < 0.1.5 zeroed the delta here)
    "breadcrumbs_no_outliers": ("breadcrumbs(base, [m0], weights=[1], density=0.5)",
                                [[1.5, 1.0, 1.0], [2.0, 1.0, -1.0]]),
    # density 1 keeps every entry; the L1 rescale factor is then exactly 1
    "dare_linear_dense": (f"dare_linear({ALL})", [[1.5, -0.75, 0.375], [0.75, 2.75, 0.25]]),
    "dare_ties_dense": (f"dare_ties({ALL})",  # not normalized: Σ of the agreeing weighted deltas
                        [[2.0, -1.25, 0.0], [-0.5, 2.75, -1.0]]),
    "della_dense": (f"della({ALL})", [[1 + 1 / 3, 0.25, 0.5], [0.25, 1 + 1.75 / 3, -1.0]]),
    "della_linear_dense": (f"della_linear({ALL})", [[1.5, -0.75, 0.375], [0.75, 2.75, 0.25]]),
}


def _header(models: dict) -> str:
    return "".join(f'{name} = model("{name}")\n' for name in models)


def merge(tmp_path: Path, expr: str, models: dict | None = None, seed: int = 0) -> torch.Tensor:
    """`output EXPR` over hand-made models (each holds one tensor, `w`), computed and written in float32."""
    models = models or MODELS
    return run_tensors(_header(models) + f"output {expr}\n", models, tmp_path, seed=seed)["w"]


@pytest.mark.parametrize("case", list(HAND))
def test_hand_computed(case, tmp_path):
    expr, expected = HAND[case]
    got = merge(tmp_path, expr)
    torch.testing.assert_close(got, torch.tensor(expected), rtol=1e-6, atol=0)


def test_exact_binary_cases_are_bit_exact(tmp_path):
    """Where every intermediate is a binary fraction, the results are exact, not just close."""
    for case in ("ties", "ties_count", "breadcrumbs", "breadcrumbs_ties", "dare_ties_dense"):
        expr, expected = HAND[case]
        assert torch.equal(merge(tmp_path, expr), torch.tensor(expected)), case


# ---- random methods on hand-made tensors: the structure of the result --------------------------------

SIGNS = torch.tensor([1.0, -1.0, 1.0, -1.0, -1.0, 1.0]).repeat(200).view(40, 30)  # ±0.5 deltas, L1 = 600


def random_models() -> dict:
    return {"base": {"w": torch.ones(40, 30)}, "e": {"w": 1 + 0.5 * SIGNS}}


@pytest.mark.parametrize("method,weight", [("dare_linear", 2), ("dare_ties", 2), ("della_linear", 2), ("della", 1)])
def test_random_methods_keep_about_density_and_match_the_l1_norm(method, weight, tmp_path):
    """One model of 1200 equal-magnitude deltas ±0.5 (L1 = 600), weight 2: whatever the mask, with j entries
    kept the L1 rescale makes each kept delta ±0.5 · 600 / (0.5 · j) = ±600 / j, then weighted (2) and,
    for della (normalize=true), divided by the weight again; the rest are 0."""
    extra = ", epsilon=0.1" if method.startswith("della") else ""
    out = merge(tmp_path, f"{method}(base, [e], weights=[2], density=0.3{extra})", random_models(), seed=5) - 1
    kept = out != 0
    j = int(kept.sum())
    n = out.numel()
    assert abs(j / n - 0.3) < 4 * math.sqrt(0.3 * 0.7 / n)
    assert torch.allclose(out[kept], (weight * SIGNS * 600 / j)[kept], rtol=1e-6, atol=0)


def test_without_rescale_kept_entries_are_unscaled(tmp_path):
    """mergekit's dare_* with rescale=false only drop: no 1/density factor (the `dare` primitive has it)."""
    out = merge(tmp_path, "dare_linear(base, [e], weights=[2], density=0.5, rescale=false)", random_models(), seed=1) - 1
    kept = out != 0
    assert 0.4 < kept.double().mean() < 0.6
    assert torch.equal(out[kept], (2 * 0.5 * SIGNS)[kept])


def test_masks_differ_per_model_and_seed(tmp_path):
    models = {**random_models(), "f": {"w": 1 + 0.5 * SIGNS}}
    out = merge(tmp_path, "dare_linear(base, [e, f], weights=[1, -1], density=0.5, rescale=false)", models) - 1
    assert (out != 0).any()  # e and f have equal deltas: only different masks leave anything
    a = merge(tmp_path, "dare_linear(base, [e], weights=[1], density=0.5)", random_models(), seed=1)
    b = merge(tmp_path, "dare_linear(base, [e], weights=[1], density=0.5, seed=1)", random_models(), seed=1)
    c = merge(tmp_path, "dare_linear(base, [e], weights=[1], density=0.5)", random_models(), seed=2)
    assert not torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a, merge(tmp_path, "dare_linear(base, [e], weights=[1], density=0.5)", random_models(), seed=1))


# ---- primitives ------------------------------------------------------------------------------------------

X = Node("load", (), {"model": "x"})


def evaluate(graph: Node, x: torch.Tensor, chunk: int = 1 << 20, seed: int = 0) -> torch.Tensor:
    return evaluate_in_memory(TensorPlan("t.weight", graph, tuple(x.shape), "F32"), {"x": x},
                              ExecOptions(seed=seed, chunk=chunk))


def test_disjoint_merge_kernel():
    xs = [D0, D1, D2]
    out = OPS["disjoint_merge"].kernel(KernelContext(), *xs, weights=[1.0, 1.0, 2.0], normalize=True,
                                       consensus_method="sum")
    torch.testing.assert_close(out, torch.tensor([[1 / 3, -0.75, -0.5], [-0.75, 1.75 / 3, -2.0]]))  # ties_dense
    plain = OPS["disjoint_merge"].kernel(KernelContext(), *xs, weights=[1.0, 1.0, 1.0], normalize=True,
                                         consensus_method="sum")
    # the paper's disjoint mean: sums [0.25, -0.75, -0.125, 0.5, 1.25, -0.875] elect
    # + - - + + -; e0: (0.5 + 0.25)/2, e1: (-0.25 - 1)/2, e3: (1 + 0.25)/2, e4: (0.75 + 0.5)/2
    assert plain.tolist() == [[0.375, -0.625, -0.5], [0.625, 0.625, -2.0]]
    zero = OPS["disjoint_merge"].kernel(KernelContext(), torch.zeros(3), torch.zeros(3), weights=[1.0, 2.0],
                                        normalize=True, consensus_method="sum")
    assert zero.tolist() == [0.0, 0.0, 0.0]  # nothing agrees: divided by 1, not 0


def test_weighted_sum_kernel_and_check():
    ws = OPS["weighted_sum"]
    assert ws.kernel(KernelContext(), D0, D1, weights=[0.5, 0.25], normalize=True).tolist() == \
        ((0.5 * D0 + 0.25 * D1) / 0.75).tolist()
    assert ws.check_all({"weights": [1.0, -1.0], "normalize": True})
    assert not ws.check_all({"weights": [1.0, -1.0], "normalize": False})


def test_l1_ratio_and_ifelse():
    r = OPS["l1_ratio"].kernel(KernelContext(), (2, 3))
    r.update(0, D0, torch.where(D0.abs() >= 1, D0, 0.0))
    assert r.end_pass(0) and r.result().item() == torch.tensor(3.875 / 3.0).item()  # float32 of the ratio
    tiny = OPS["l1_ratio"].kernel(KernelContext(), (1,))
    tiny.update(0, torch.tensor([1e-8]), torch.tensor([0.0]))
    tiny.end_pass(0)
    assert tiny.result().item() == 1.0  # a norm below 1e-7: no rescale (mergekit's eps)
    assert OPS["ifelse"].kernel(KernelContext(), 2.0, 3.0, cond=True) == 2.0
    assert OPS["ifelse"].kernel(KernelContext(), 2.0, 3.0, cond=False) == 3.0


def test_magprune_probabilities_by_hand():
    rows = magprune_probabilities(torch.tensor([[0.5, 0.25, 0.125], [1.0, 0.0, 2.0]]), 0.5, 0.1)
    torch.testing.assert_close(rows, torch.tensor([[0.6, 0.5, 0.4], [0.5, 0.4, 0.6]]))
    whole = magprune_probabilities(D0.reshape(1, -1).abs(), 0.5, 0.1)  # ranks 3 2 1 4 0 5 of 5
    torch.testing.assert_close(whole, torch.tensor([[0.52, 0.48, 0.44, 0.56, 0.40, 0.60]]))
    ties = magprune_probabilities(torch.ones(1, 3), 0.5, 0.1)  # equal magnitudes: lower index ranks higher
    torch.testing.assert_close(ties, torch.tensor([[0.6, 0.5, 0.4]]))
    assert magprune_probabilities(torch.ones(1, 1), 0.5, 0.1).tolist() == [[0.5]]  # mergekit: NaN


def magprune_node(density: float, epsilon: float) -> Node:
    return with_random_key(Node("magprune", [X, const(density), const(epsilon), const(0)]))


def test_magprune_keep_rate_rises_with_rank():
    """10 distinct magnitudes per row, 3000 rows: rank r is kept with probability 0.3 + 0.4·r/9."""
    g = torch.Generator().manual_seed(0)
    x = torch.stack([torch.randperm(10, generator=g).float() + 1 for _ in range(3000)])
    out = evaluate(magprune_node(0.5, 0.2), x, seed=3)
    kept = (out != 0).double()
    for r in range(10):
        rate = kept[x == r + 1].mean().item()
        p = 0.3 + 0.4 * r / 9
        assert abs(rate - p) < 4 * math.sqrt(p * (1 - p) / 3000), (r, rate, p)
    assert torch.equal(out[out != 0], x[out != 0])  # magprune itself does not rescale
    assert torch.equal(out, evaluate(magprune_node(0.5, 0.2), x, chunk=7, seed=3))  # chunk-invariant


def test_keep_random_is_chunk_invariant_and_exact_fraction():
    node = with_random_key(Node("keep_random", [X, const(0.9), const(0)]))
    x = torch.randn(300, 101)
    whole = evaluate(node, x, seed=4)
    assert torch.equal(whole, evaluate(node, x, chunk=1000, seed=4))
    n = x.numel()
    assert abs((whole != 0).double().mean().item() - 0.9) < 4 * math.sqrt(0.09 / n)


def test_magprune_epsilon_check():
    check = OPS["magprune"].check_all
    assert check({"density": 0.1, "epsilon": 0.15, "seed": 0})[0][0] == "epsilon"
    assert check({"density": 0.9, "epsilon": 0.15, "seed": 0})[0][0] == "epsilon"
    assert check({"density": 0.85, "epsilon": 0.15, "seed": 0}) == []  # the largest probability may be 1
    assert check({"density": 1.0, "epsilon": 0.5, "seed": 0}) == []  # density 1 keeps all: epsilon unused


# ---- mergekit on tiny Llamas -------------------------------------------------------------------------------

W = [0.5, 0.3, 0.2]


@pytest.fixture(scope="module")
def fam(tmp_path_factory) -> Path:
    return make_family(tmp_path_factory.mktemp("ta_family"), 3)


@pytest.fixture(scope="module")
def fam32(tmp_path_factory) -> Path:
    """float32 checkpoints: magnitudes of float32 deltas (practically) never tie at a top-k cut."""
    root = tmp_path_factory.mktemp("ta_family32")
    make_tiny_llama(root / "base", seed=0, dtype=torch.float32)
    for i in range(3):
        make_tiny_llama(root / f"ft{i}", seed=i + 1, base=root / "base", dtype=torch.float32)
    return root


def mk_config(root: Path, method: str, per_model: dict | None = None, params: dict | None = None,
              n: int = 3, weights=W, base: bool = True) -> dict:
    models = []
    for i in range(n):
        p = {"weight": weights[i]}
        for k, v in (per_model or {}).items():
            p[k] = v[i] if isinstance(v, list) else v
        models.append({"model": str(root / f"ft{i}"), "parameters": p})
    config = {"merge_method": method, "models": models}
    if base:
        config["base_model"] = str(root / "base")
    if params:
        config["parameters"] = params
    return config


def ml_spec(expr: str, n: int = 3) -> str:
    return 'base = model("base")\n' + "".join(f'ft{i} = model("ft{i}")\n' for i in range(n)) + f"output {expr}\n"


def both(root: Path, tmp: Path, config: dict, expr: str, n: int = 3, out_dtype: str = "bfloat16", seed: int = 0):
    theirs = run_mergekit({**config, "out_dtype": out_dtype}, tmp / "mk", seed=seed)
    extra = ("--dtype", "fp32") if out_dtype == "float32" else ("--dtype", "bf16")
    ours = run_mergelang(ml_spec(expr, n), root, tmp / "ml", seed=seed, extra=extra)
    return ours, theirs


FT = "[ft0, ft1, ft2]"

DETERMINISTIC = {
    "linear": ({"method": "linear", "base": False}, f"linear({FT}, weights=[0.5, 0.3, 0.2])"),
    "linear_unnormalized": ({"method": "linear", "base": False, "params": {"normalize": False}},
                            f"linear({FT}, weights=[0.5, 0.3, 0.2], normalize=false)"),
    "task_arithmetic": ({"method": "task_arithmetic"}, f"task_arithmetic(base, {FT}, weights=[0.5, 0.3, 0.2])"),
    "task_arithmetic_normalized": ({"method": "task_arithmetic", "params": {"normalize": True, "lambda": 0.7}},
                                   f"task_arithmetic(base, {FT}, weights=[0.5, 0.3, 0.2], normalize=true, lambda=0.7)"),
    # the random sparsifiers keep everything at density 1: the combination steps, bit for bit
    "dare_ties_dense": ({"method": "dare_ties"}, f"dare_ties(base, {FT}, weights=[0.5, 0.3, 0.2])"),
    "dare_linear_dense": ({"method": "dare_linear", "params": {"lambda": 0.5}},
                          f"dare_linear(base, {FT}, weights=[0.5, 0.3, 0.2], lambda=0.5)"),
    "della_dense": ({"method": "della"}, f"della(base, {FT}, weights=[0.5, 0.3, 0.2])"),
    "della_linear_dense": ({"method": "della_linear", "params": {"normalize": True}},
                           f"della_linear(base, {FT}, weights=[0.5, 0.3, 0.2], normalize=true)"),
}


@pytest.mark.parametrize("case", list(DETERMINISTIC))
def test_deterministic_methods_match_mergekit(case, fam, tmp_path):
    require_mergekit()
    spec, expr = DETERMINISTIC[case]
    config = mk_config(fam, spec["method"], params=spec.get("params"), base=spec.get("base", True))
    ours, theirs = both(fam, tmp_path, config, expr)
    if spec["method"] != "linear":
        assert_close_ulp(ours, theirs, max_ulp=1)
        return
    # mergekit's linear accumulates with torch.addcmul, which CPUs compute as a fused multiply-add;
    # mergelang rounds each product (the same bytes on every machine). The float32 sums then differ by
    # a rounding of the terms (~1e-9 here), more than one bf16 ulp only where the sum nearly cancels.
    assert ours.keys() == theirs.keys()
    for name in ours:
        bad = ulp_diff(ours[name], theirs[name]) > 1
        assert (theirs[name].float()[bad].abs() < 1e-6).all(), name


# Top-k methods: k entries kept exactly, as in mergekit, but mergekit picks among equal magnitudes by an
# unstable sort and mergelang by index. bf16 deltas repeat magnitudes, so the two differ where an entry's
# magnitude equals the cut magnitude of some model; everywhere else they agree within 1 ulp.
TOPK = {
    "ties": ({"density": 0.5}, None, f"ties(base, {FT}, weights=[0.5, 0.3, 0.2], density=0.5)"),
    "ties_rescaled": ({"density": [0.3, 0.5, 0.7]}, {"rescale": True, "normalize": False, "lambda": 0.8},
                      f"ties(base, {FT}, weights=[0.5, 0.3, 0.2], density=[0.3, 0.5, 0.7], rescale=true, "
                      "normalize=false, lambda=0.8)"),
    "breadcrumbs": ({"density": 0.5, "gamma": 0.05}, None,
                    f"breadcrumbs(base, {FT}, weights=[0.5, 0.3, 0.2], density=0.5, gamma=0.05)"),
    "breadcrumbs_ties": ({"density": 0.4, "gamma": [0.02, 0.01, 0.1]}, {"normalize": True, "rescale": True},
                         f"breadcrumbs_ties(base, {FT}, weights=[0.5, 0.3, 0.2], density=0.4, "
                         "gamma=[0.02, 0.01, 0.1], normalize=true, rescale=true)"),
}


def cut_ranks(method: str, n: int, density: float, gamma: float) -> list[int]:
    if method.startswith("ties"):
        return [topk_count(n, density)]
    cut, kept = band_counts(n, density, gamma)
    return [r for r in (cut + 1 if cut else 0, cut + kept if kept else 0) if r]


def tie_entries(root: Path, name: str, method: str, per_model: dict) -> torch.Tensor:
    """Entries whose |delta| in some model equals that model's magnitude at a cut rank."""
    base = load_folder(root / "base")[name].float().reshape(-1)
    out = torch.zeros(base.numel(), dtype=torch.bool)
    for i in range(3):
        d = (load_folder(root / f"ft{i}")[name].float().reshape(-1) - base).abs()
        density = per_model["density"][i] if isinstance(per_model["density"], list) else per_model["density"]
        gamma = per_model.get("gamma", 0.0)
        gamma = gamma[i] if isinstance(gamma, list) else gamma
        for r in cut_ranks(method, d.numel(), density, gamma):
            out |= d == torch.kthvalue(d, d.numel() - r + 1).values
    return out


@pytest.mark.parametrize("case", list(TOPK))
def test_topk_methods_match_mergekit_except_on_ties(case, fam, tmp_path):
    require_mergekit()
    per_model, params, expr = TOPK[case]
    method = expr.split("(")[0]
    ours, theirs = both(fam, tmp_path, mk_config(fam, method, per_model, params), expr)
    assert ours.keys() == theirs.keys()
    differ = total = 0
    for name in ours:
        bad = (ulp_diff(ours[name], theirs[name]) > 1).reshape(-1)
        total += bad.numel()
        if bad.any():
            ties = tie_entries(fam, name, method, per_model)
            assert not (bad & ~ties).any(), f"{name}: entries off a top-k tie differ"
            differ += int(bad.sum())
    assert differ / total < 0.02


@pytest.mark.parametrize("case", ["ties", "breadcrumbs_ties"])
def test_topk_methods_match_mergekit_bitwise_without_ties(case, fam32, tmp_path):
    require_mergekit()
    per_model, params, expr = TOPK[case]
    ours, theirs = both(fam32, tmp_path, mk_config(fam32, expr.split("(")[0], per_model, params), expr)
    assert_close_ulp(ours, theirs, max_ulp=1)


def sparsified_stats(out: dict, root: Path) -> tuple[int, int]:
    """For a one-model merge with weight 1 (no normalization): every tensor's kept deltas are scaled by one
    factor, and its L1 norm is the dense delta's (mergekit's rescale). Returns (entries kept, entries)."""
    base, ft = load_folder(root / "base"), load_folder(root / "ft0")
    kept = total = 0
    for name, merged in out.items():
        d = ft[name].float() - base[name].float()
        got = merged.float() - base[name].float()
        k = (got != 0) & (d != 0)
        kept += int(k.sum())
        total += int((d != 0).sum())
        if k.any():
            factor = got[k] / d[k]
            assert torch.allclose(factor, factor.mean(), rtol=1e-3), name
            assert got.abs().sum().item() == pytest.approx(d.abs().sum().item(), rel=1e-3), name
    return kept, total


@pytest.mark.parametrize("method,density,extra", [("dare_linear", 0.3, {}), ("dare_ties", 0.6, {}),
                                                   ("della_linear", 0.5, {"epsilon": 0.2})])
def test_random_methods_match_mergekit_statistically(method, density, extra, fam, tmp_path):
    """One fine-tune, weight 1: both tools keep about `density` of the entries and rescale to the dense L1
    norm; the masks themselves differ (mergekit uses torch's generator, mergelang a counter-based hash)."""
    require_mergekit()
    config = mk_config(fam, method, {"density": density, **extra}, n=1, weights=[1.0])
    args = "".join(f", {k}={v}" for k, v in extra.items())
    ours, theirs = both(fam, tmp_path, config, f"{method}(base, [ft0], weights=[1], density={density}{args})",
                        n=1, out_dtype="float32", seed=3)
    for out in (ours, theirs):
        kept, total = sparsified_stats(out, fam)
        assert abs(kept / total - density) < 4 * math.sqrt(density * (1 - density) / total)


# ---- mergelang check -----------------------------------------------------------------------------------


def check(fam: Path, expr: str) -> str:
    path = fam / "check.ml"
    path.write_text('base = model("base")\na = model("ft0")\nb = model("ft1")\n' + f"output {expr}\n")
    result = CliRunner().invoke(main, ["check", str(path)])
    assert result.exit_code == 1, result.output
    return result.output


CHECKS = {
    "unknown parameter": ("ties(base, [a, b], weights=[0.5, 0.5], densty=0.5)",
                          ["error[E004]: `ties` has no parameter `densty`", "did you mean `density`?", ":4:47"]),
    "singular weight": ("dare_ties(base, [a, b], weight=[0.5, 0.5])",
                        ["error[E004]: `dare_ties` has no parameter `weight`", "did you mean `weights`?", ":4:32"]),
    "density out of range": ("ties(base, [a, b], weights=[0.5, 0.5], density=1.5)",
                             ["error[E006]: `density` of `topk_cutoff` must be in (0, 1], got 1.5", ":4:8"]),
    "zero density": ("dare_linear(base, [a, b], weights=[0.5, 0.5], density=[0.5, 0])",
                     ["error[E006]: `density` of `keep_random` must be in (0, 1], got 0", ":4:8"]),
    "gamma out of range": ("breadcrumbs(base, [a, b], weights=[1, 1], density=0.5, gamma=1.5)",
                           ["error[E006]: `gamma` of `band_cutoff` must be in [0, 1], got 1.5", ":4:8"]),
    "epsilon too large": ("della(base, [a, b], weights=[1, 1], density=0.9)",
                          ["error[E006]: `epsilon` of `magprune` must be at most 1 - density = 0.1", "got 0.15",
                           ":4:8"]),
    "epsilon above density": ("della_linear(base, [a, b], weights=[1, 1], density=0.1, epsilon=0.15)",
                              ["`epsilon` of `magprune` must be below density = 0.1", ":4:8"]),
    "weights list too long": ("ties(base, [a, b], weights=[0.5, 0.3, 0.2])",
                              ["error[E013]: `weights` of `disjoint_merge` needs one value per input: 2, found a list "
                               "of 3", ":4:8"]),
    "density list too short": ("breadcrumbs(base, [a, b], weights=[1, 1], density=[0.5])",
                               ["error[E013]", "lists of different lengths: 2 and 1", ":4:8"]),
    "weights summing to zero": ("linear([a, b], weights=[1, -1])",
                                ["error[E006]: `weights` of `weighted_sum` must not sum to 0 when normalize=true",
                                 ":4:8"]),
    "unknown consensus": ('ties(base, [a, b], weights=[1, 1], consensus_method="median")',
                          ['error[E005]: `consensus_method` of `disjoint_merge` must be one of "sum", "count", '
                           'found "median"', ":4:8"]),
    "normalize not a boolean": ("task_arithmetic(base, [a, b], weights=[1, 1], normalize=1)",
                                ["error[E005]: `normalize` of `weighted_sum` must be true or false, found a number",
                                 ":4:8"]),
}


@pytest.mark.parametrize("case", list(CHECKS))
def test_check_reports(case, fam):
    expr, fragments = CHECKS[case]
    output = check(fam, expr)
    for fragment in fragments:
        assert fragment in output, f"{fragment!r} not in:\n{output}"
    assert f"{fam / 'check.ml'}:4:" in output  # at the spec's own line


def test_breadcrumbs_range_error_reported_once(fam):
    output = check(fam, "breadcrumbs(base, [a, b], weights=[1, 1], density=0.5, gamma=1.5)")
    assert output.count("`gamma` of `band_cutoff`") == 1


def test_valid_calls_check_clean(fam):
    path = fam / "ok.ml"
    path.write_text('base = model("base")\na = model("ft0")\nb = model("ft1")\n'
                    "t = ties(base, [a, b], weights=[0.5, 0.5], density=0.5, int8_mask=true)\n"
                    "d = della(base, [a, b], weights=[0.5, 0.5], density=0.85, epsilon=0.15)\n"
                    "output linear([t, d], weights=[1, 1])\n")
    result = CliRunner().invoke(main, ["check", str(path)])
    assert result.exit_code == 0, result.output


# ---- whole-model top-k (the TIES paper's trim) ----------------------------------------------------


def _global_reference(deltas: list[torch.Tensor], density: float) -> list[torch.Tensor]:
    """MergeLM's mask_smallest_magnitude_param_values on one model: kthvalue over all its entries."""
    flat = torch.cat([d.reshape(-1) for d in deltas])
    k = int(flat.numel() * (1 - density))
    t = flat.abs().kthvalue(k).values if k > 0 else torch.tensor(0.0)
    return [torch.where(d.abs() >= t, d, torch.zeros(())) for d in deltas]


def test_model_magnitude_threshold_spans_every_tensor(tmp_path):
    gen = torch.Generator().manual_seed(3)
    base = {"a.weight": torch.randn(6, 5, generator=gen), "b.weight": torch.randn(4, generator=gen) * 3}
    ft = {k: v + torch.randn(v.shape, generator=gen) * (0.1 if k == "a.weight" else 1.0) for k, v in base.items()}
    out = run_tensors('base = model("base")\nft = model("ft")\n'
                      'output base + keep_at_least(ft - base, model_magnitude_threshold(ft - base, density=0.3))\n',
                      {"base": base, "ft": ft}, tmp_path)
    deltas = [ft[k] - base[k] for k in base]
    for name, expected in zip(base, _global_reference(deltas, 0.3)):
        assert torch.equal(out[name], base[name] + expected), name
    # Per tensor, `b` (large deltas) would keep 30% of its entries; over the model it keeps more.
    kept_b = (out["b.weight"] != base["b.weight"]).sum().item()
    assert kept_b > int(0.3 * 4)


def test_ties_global_topk_by_hand(tmp_path):
    base = {"w": torch.zeros(2, 3), "v": torch.zeros(2)}
    a = {"w": torch.tensor([[0.1, -0.4, 0.3], [0.0, 0.2, -0.05]]), "v": torch.tensor([0.5, -0.01])}
    b = {"w": torch.tensor([[-0.2, -0.1, 0.3], [0.6, 0.0, 0.05]]), "v": torch.tensor([0.02, 0.3])}
    out = run_tensors('base = model("base")\na = model("a")\nb = model("b")\n'
                      'output ties(base, [a, b], weights=[1, 1], density=0.5, global_topk=true)\n',
                      {"base": base, "a": a, "b": b}, tmp_path)
    # a's 8 magnitudes: .1 .4 .3 0 .2 .05 .5 .01; k = 4 smallest -> threshold .1: keep .1 .4 .3 .2 .5
    # b's: .2 .1 .3 .6 0 .05 .02 .3; threshold (4th smallest) .1: keep .2 .1 .3 .6 .3
    # trimmed a: w [[.1, -.4, .3], [0, .2, 0]], v [.5, 0]; trimmed b: w [[-.2, -.1, .3], [.6, 0, 0]], v [0, .3]
    # Sign election by the sum (w[0,0]: .1 - .2 < 0 elects -), then the mean of the agreeing entries.
    expected_w = torch.tensor([[-0.2, (-0.4 - 0.1) / 2, 0.3], [0.6, 0.2, 0.0]])
    expected_v = torch.tensor([0.5, 0.3])
    assert torch.allclose(out["w"], expected_w, rtol=0, atol=1e-7)
    assert torch.allclose(out["v"], expected_v, rtol=0, atol=1e-7)
    # Per tensor (mergekit), `v` of b would keep its larger entry only: the same here, but w differs.
    per_tensor = run_tensors('base = model("base")\na = model("a")\nb = model("b")\n'
                             'output ties(base, [a, b], weights=[1, 1], density=0.5)\n',
                             {"base": base, "a": a, "b": b}, tmp_path / "per_tensor")
    assert not torch.equal(per_tensor["w"], out["w"])


@pytest.mark.parametrize("method", ["sum", "count"])
@pytest.mark.parametrize("weights", [[0.5, 0.3, 0.2], [1.0, -2.0, 0.5]])
def test_disjoint_merge_bits_against_a_scalar_reference(method, weights):
    """Entry by entry in float32 with numpy scalars (the docstring's definition): signed zeros, NaN
    and infinities included; zeros that come out +0.0 must not come out -0.0."""
    import numpy as np

    f = np.float32
    vals = [0.0, -0.0, 1.5, -1.5, 0.25, -3.0, math.inf, -math.inf, math.nan, 1e-45]
    g = torch.Generator().manual_seed(5)
    xs = [torch.tensor(vals)[torch.randint(0, len(vals), (600,), generator=g)] for _ in weights]
    out = OPS["disjoint_merge"].kernel(KernelContext(), *xs, weights=weights, normalize=True,
                                       consensus_method=method)

    def sign(v):  # as torch.sign on CPU: (v > 0) - (v < 0), so 0 for NaN
        return f(int(v > 0) - int(v < 0))

    want = []
    for i in range(600):
        d = [f(x[i].item()) * f(w) for x, w in zip(xs, weights)]
        score = d[0] if method == "sum" else sign(d[0])
        for v in d[1:]:
            score = score + (v if method == "sum" else sign(v))
        elected = f(1.0) if score >= 0 else f(-1.0)
        total = divisor = None
        for v, w in zip(d, weights):
            agree = sign(v) == elected
            term, share = (v, f(w)) if agree else (f(0.0), f(0.0))
            total = term if total is None else total + term
            divisor = share if divisor is None else divisor + share
        want.append(total / (f(1.0) if divisor == 0 else divisor))
    with np.errstate(all="ignore"):
        want = torch.from_numpy(np.array(want, dtype=np.float32))
    bad = (out.view(torch.int32) != want.view(torch.int32)).nonzero().flatten().tolist()
    assert not bad, [(i, [x[i].item() for x in xs], out[i].item(), want[i].item()) for i in bad[:3]]
