"""sce, ram, ramplus_tl, arcee_fusion and their selection primitives: hand-computed tensors,
brute-force references for the primitives, mergekit's own output, and `mergelang check`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from mergelang.api import RunOptions, run
from mergelang.check import TensorPlan
from mergelang.cli import main
from mergelang.execute import ExecOptions, evaluate_in_memory
from mergelang.graph import Node, const
from oracle import assert_close_ulp, load_folder, make_family, require_mergekit, run_mergekit, run_mergelang, \
    run_tensors

T = torch.tensor


def load(name: str) -> Node:
    return Node("load", (), {"model": name})


def evaluate(graph: Node, inputs: dict[str, torch.Tensor], chunk: int = 1 << 20) -> torch.Tensor:
    """The graph's value for one tensor, through the executor's chunked path."""
    shape = tuple(next(iter(inputs.values())).shape)
    tp = TensorPlan("t.weight", graph, shape, "F32")
    return evaluate_in_memory(tp, {k: v.float() for k, v in inputs.items()}, ExecOptions(chunk=chunk))


# ---- primitives ----------------------------------------------------------------------------------


def topk_mask(x: torch.Tensor, density: float, chunk: int = 1 << 20) -> torch.Tensor:
    cutoff = Node("nonzero_topk_cutoff", [load("x"), const(density)])
    return evaluate(Node("top_mask", [load("x"), cutoff]), {"x": x}, chunk)


def reference_topk_mask(x: torch.Tensor, density: float) -> torch.Tensor:
    """Brute force: order by (|x| descending, index ascending) and keep the first k."""
    flat = x.reshape(-1).float().abs()
    if density >= 1:
        return torch.ones_like(x, dtype=torch.float32)
    k = int(torch.tensor(int(torch.count_nonzero(flat)), dtype=torch.int64) * density)
    order = sorted(range(flat.numel()), key=lambda i: (-flat[i].item(), i))
    mask = torch.zeros(flat.numel())
    mask[order[:k]] = 1
    return mask.view(x.shape)


def test_topk_mask_hand_computed():
    x = T([[0.5, -3.0, 0.0], [2.0, -0.5, 0.0]])
    # 4 nonzero entries; density 0.5 keeps k = 2: |-3| and |2|.
    assert topk_mask(x, 0.5).tolist() == [[0, 1, 0], [1, 0, 0]]
    # k = int(4 * 0.75) = 3: -3, 2, then the tie between 0.5 (index 0) and -0.5 (index 4) goes to index 0.
    assert topk_mask(x, 0.75).tolist() == [[1, 1, 0], [1, 0, 0]]
    # k = int(4 * 0.2) = 0 keeps nothing; density 0 keeps nothing; density 1 keeps every entry, zeros too.
    assert topk_mask(x, 0.2).tolist() == [[0, 0, 0], [0, 0, 0]]
    assert topk_mask(x, 0.0).tolist() == [[0, 0, 0], [0, 0, 0]]
    assert topk_mask(x, 1.0).tolist() == [[1, 1, 1], [1, 1, 1]]
    # Zeros are never kept below density 1, even when k would reach them: k = int(4 * 0.99) = 3.
    assert topk_mask(x, 0.99).tolist() == [[1, 1, 0], [1, 0, 0]]


@pytest.mark.parametrize("chunk", [5, 15, 1 << 20])  # rows of 5 entries: 1 row, 3 rows, all at once
def test_topk_mask_exact_k_with_many_ties_any_chunking(chunk):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-3, 4, (37, 5), generator=g).float() * 0.25  # few distinct magnitudes: many ties
    x[3, 2] = -0.0
    for density in (0.1, 0.33, 0.5, 0.9):
        got = topk_mask(x, density, chunk)
        assert torch.equal(got, reference_topk_mask(x, density)), density


@settings(max_examples=25, deadline=None)
@given(st.lists(st.sampled_from([0.0, -0.0, 1.0, -1.0, 2.0, 0.5, -7.25, 1e-30, float("inf")]), min_size=1,
                max_size=40),
       st.floats(0.0, 1.0), st.integers(1, 9))
def test_topk_mask_matches_brute_force(values, density, chunk):
    x = T(values)
    assert torch.equal(topk_mask(x, density, chunk), reference_topk_mask(x, density))


def quantile(x: torch.Tensor, q: float, chunk: int = 1 << 20) -> torch.Tensor:
    return evaluate(Node("quantile", [load("x"), const(q)]), {"x": x}, chunk)


def test_quantile_hand_computed():
    x = T([[4.0, -1.0, 0.0], [2.5, -3.0, 7.0]])  # sorted: -3, -1, 0, 2.5, 4, 7; n - 1 = 5
    assert quantile(x, 0.0).flatten()[0].item() == -3.0
    assert quantile(x, 0.25).flatten()[0].item() == -1.0  # rank int(1.25) = 1
    assert quantile(x, 0.5).flatten()[0].item() == 0.0  # rank int(2.5) = 2 (lower, not interpolated)
    assert quantile(x, 0.75).flatten()[0].item() == 2.5  # rank int(3.75) = 3
    assert quantile(x, 1.0).flatten()[0].item() == 7.0


@pytest.mark.parametrize("chunk", [7, 91, 1 << 20])  # rows of 7 entries: 1 row, 13 rows, all at once
def test_quantile_matches_sort(chunk):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(31, 7, generator=g) * torch.logspace(-30, 30, 7)
    x[0, :3] = torch.tensor([-0.0, 0.0, float("-inf")])
    x[5] = x[6]  # ties
    ordered = torch.sort(x.flatten()).values
    for q in (0.0, 0.25, 0.5, 0.9, 1.0):
        rank = int((T([q]) * (x.numel() - 1)).long())
        got = quantile(x, q, chunk).flatten()[0]
        assert got.item() == ordered[rank].item(), q


def softmax_kl(x: torch.Tensor, y: torch.Tensor, chunk: int = 1 << 20) -> torch.Tensor:
    kl = Node("softmax_kl", [load("x"), load("y"), const(1e-8)])
    spread = Node("add", [kl, Node("mul", [load("x"), const(0.0)])])  # the statistic at every entry
    return evaluate(spread, {"x": x, "y": y}, chunk)


def reference_kl(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    p = torch.softmax(x, dim=-1) + 1e-8
    q = torch.softmax(y, dim=-1) + 1e-8
    return torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)


def test_softmax_kl_hand_computed():
    # Equal rows have divergence 0; [0, ln 3] against [0, 0]: p = (1/4, 3/4), q = (1/2, 1/2),
    # KL = 1/4 ln(1/2) + 3/4 ln(3/2) = 0.1308...
    x = T([[1.0, 2.0], [0.0, 1.0986122886681098]])
    y = T([[1.0, 2.0], [0.0, 0.0]])
    got = softmax_kl(x, y)
    assert got[0, 0].item() == 0.0
    assert got[1, 0].item() == pytest.approx(0.25 * -0.6931471805599453 + 0.75 * 0.4054651081081644, abs=1e-6)


@pytest.mark.parametrize("chunk", [1, 5, 1 << 20])
@pytest.mark.parametrize("shape", [(9, 6), (4, 3, 5), (17,)])
def test_softmax_kl_matches_mergekit_formula_bitwise(shape, chunk):
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    expected = reference_kl(x, y)  # a 1-d tensor is one vector: one value for the whole tensor
    assert torch.equal(softmax_kl(x, y, chunk), expected.expand(shape))


def test_variance_mean_and_masks():
    a, b, c = T([[1.0, -2.0, 3.0], [0.0, 4.0, 1.0]]), T([[3.0, 2.0, 3.0], [0.0, 0.0, 1.0]]), T([[2.0, 0.0, 3.0],
                                                                                              [6.0, 2.0, 1.0]])
    var = evaluate(Node("variance", [load("a"), load("b"), load("c")]), {"a": a, "b": b, "c": c}, chunk=3)
    # mean 2, deviations (-1, 1, 0): 2/3; mean 0: (4+4+0)/3; 0; mean 2: (4+4+16)/3; mean 2: (4+4+0)/3; 0
    assert var.flatten().tolist() == pytest.approx([2 / 3, 8 / 3, 0.0, 8.0, 8 / 3, 0.0], rel=1e-6)
    assert torch.equal(var, torch.var(torch.stack([a, b, c]), dim=0, unbiased=False))
    m = evaluate(Node("mean", [load("a")]), {"a": a}, chunk=3)
    assert m.flatten()[0].item() == torch.tensor(7 / 6).item() == m[1, 2].item()  # (1 - 2 + 3 + 0 + 4 + 1) / 6
    nz = evaluate(Node("nonzero_mask", [load("a"), const(1.0)]), {"a": a})
    assert nz.tolist() == [[0, 1, 1], [0, 1, 0]]  # |x| > 1
    gt = evaluate(Node("greater", [load("a"), const(1.0)]), {"a": a})
    ge = evaluate(Node("greater_equal", [load("a"), const(1.0)]), {"a": a})
    assert gt.tolist() == [[0, 0, 1], [0, 1, 0]] and ge.tolist() == [[1, 0, 1], [0, 1, 1]]
    w = evaluate(Node("where", [Node("greater", [load("a"), const(0.0)]), load("b"), const(-1.0)]), {"a": a, "b": b})
    assert w.tolist() == [[3, -1, 3], [-1, 0, 1]]
    cl = evaluate(Node("clamp", [load("a"), const(-1.0), const(2.0)]), {"a": a})
    assert cl.tolist() == [[1, -1, 2], [0, 2, 1]]


# ---- methods on hand-made tensors ----------------------------------------------------------------


def test_sce_hand_computed(tmp_path):
    base = torch.ones(2, 3)
    # Deltas d1 = [[2, -3, 3], [0.5, 1, 0]] and d2 = [[2, 1, 1], [0, 1.5, 2]]. Variances
    # ((d1 - d2) / 2)²: [[0, 4, 1], [0.0625, 0.0625, 1]]: 5 nonzero, select_topk 0.7 keeps
    # int(3.5) = 3 (4, 1, 1). Masked: d1 = [[0, -3, 3], [0, 0, 0]], d2 = [[0, 1, 1], [0, 0, 2]].
    # Mean squares 18/6 = 3 and 6/6 = 1: weights 0.75, 0.25. Signs of d1 + d2 = [[0, -2, 4], [0, 0, 2]]:
    # (0,1): only d1 agrees: -3; (0,2): both: (3·0.75 + 1·0.25) / 1 = 2.5; (1,2): only d2: 2; else 0.
    models = {"base": {"w": base}, "a": {"w": base + T([[2.0, -3.0, 3.0], [0.5, 1.0, 0.0]])},
              "b": {"w": base + T([[2.0, 1.0, 1.0], [0.0, 1.5, 2.0]])}}
    spec = 'output sce(model("base"), [model("a"), model("b")], select_topk=0.7)\n'
    out = run_tensors(spec, models, tmp_path)["w"]
    assert out.tolist() == [[1.0, -2.0, 3.5], [1.0, 1.0, 3.0]]


def test_sce_equal_weights_when_the_total_mean_square_is_below_1e_6(tmp_path):
    a = 2.0**-12
    # Mean squares a² and (9 + 1)/6 · a², summing to 1.6e-7 < 1e-6: mergekit's weights become 1/2 each.
    # (0,0): both agree: (a + 3a) / 2 = 2a (with proportional weights it would be 2.25a).
    # (0,1): sign of a - a = 0 counts as +: only a. Elsewhere only the first delta is nonzero: a.
    models = {"base": {"w": torch.zeros(2, 3)}, "x": {"w": torch.full((2, 3), a)},
              "y": {"w": T([[3 * a, -a, 0.0], [0.0, 0.0, 0.0]])}}
    out = run_tensors('output sce(model("base"), [model("x"), model("y")])\n', models, tmp_path)["w"]
    assert out.tolist() == [[2 * a, a, a], [a, a, a]]


def test_sce_k_zero_keeps_the_base_with_its_shape(tmp_path):
    # Variances [[1, 0, 0]]: 1 nonzero entry, select_topk 0.5 gives k = 0: nothing is selected and
    # the tensor is the base, of the base's rank (mergekit without the fix of arcee-ai/mergekit#700
    # returned a rank-3 tensor here).
    models = {"base": {"w": T([[1.0, 2.0, 3.0]]), "v": T([5.0, 6.0])},
              "a": {"w": T([[3.0, 2.0, 3.0]]), "v": T([5.0, 6.0])},
              "b": {"w": T([[1.0, 2.0, 3.0]]), "v": T([7.0, 6.0])}}
    out = run_tensors('output sce(model("base"), [model("a"), model("b")], select_topk=0.5)\n', models, tmp_path)
    assert out["w"].tolist() == [[1.0, 2.0, 3.0]] and out["v"].tolist() == [5.0, 6.0]


# Deltas of three models (base = 1): |x| <= epsilon (1e-5) does not count as changed, so 1e-6 is ignored.
RAM_DELTAS = (T([[1.0, 1e-6, 2.0], [0.0, 3.0, 0.0]]),
              T([[3.0, 0.0, 0.0], [1.0, -6.0, 5.0]]),
              T([[0.0, 2.0, 4.0], [0.0, 9.0, 0.0]]))
RAM_MODELS = {"base": {"w": torch.ones(2, 3)}, **{f"m{i}": {"w": 1 + d} for i, d in enumerate(RAM_DELTAS)}}


def test_ram_hand_computed(tmp_path):
    # Changers per entry: [[2, 1, 2], [1, 3, 1]]. Shared entries are averaged over the models that
    # changed them: (1 + 3)/2 = 2, (2 + 4)/2 = 3, (3 - 6 + 9)/3 = 2; unique ones are taken whole.
    spec = 'output ram(model("base"), [model("m0"), model("m1"), model("m2")])\n'
    out = run_tensors(spec, RAM_MODELS, tmp_path)["w"]
    assert out.tolist() == [[3.0, 3.0, 4.0], [2.0, 3.0, 6.0]]


def test_ramplus_tl_hand_computed(tmp_path):
    # Per model, entries changed with others / alone: m0 3 / 0, m1 2 / 2, m2 2 / 1.
    # rho = shared / max(unique, epsilon): 3e5, 1, 2; lambda = 1 + r·clamp(rho, 0, alpha) with
    # r = 0.5, alpha = 1.5: 1.75, 1.5, 1.75. Unique entries are scaled: (0,1) m2: 2·1.75 = 3.5;
    # (1,0) m1: 1·1.5 = 1.5; (1,2) m1: 5·1.5 = 7.5. Shared entries as in ram.
    spec = 'output ramplus_tl(model("base"), [model("m0"), model("m1"), model("m2")], r=0.5, alpha=1.5)\n'
    out = run_tensors(spec, RAM_MODELS, tmp_path)["w"]
    assert out.tolist() == [[3.0, 4.5, 4.0], [2.5, 3.0, 8.5]]


def test_arcee_fusion_hand_computed(tmp_path):
    # w: row 0 is unchanged (KL 0, importance 0); row 1 changes by (1, 1.2, 3) with KL K > 0.
    # Sorted importances 0, 0, 0, K, 1.2K, 3K; n - 1 = 5, so q1, median, q3 are ranks 1, 2, 3:
    # fence = 0 + 1.5·(K - 0) = 1.5K. Only the change of 3 reaches it.
    # v (1-d: one KL K for the whole vector): |changes| sorted 0, 0.5, 1, 2, 4, 16: q1 = 0.5K,
    # median = K, q3 = 2K, fence = K + 1.5·1.5K = 3.25K: the changes 16 and -4 are taken.
    base = {"w": T([[0.0, 1.0, 2.0], [1.0, 0.0, -1.0]]), "v": torch.zeros(6)}
    other = {"w": T([[0.0, 1.0, 2.0], [2.0, 1.2, 2.0]]), "v": T([16.0, 0.0, 0.5, -4.0, 2.0, -1.0])}
    out = run_tensors('output arcee_fusion(model("base"), model("other"))\n', {"base": base, "other": other},
                      tmp_path)
    assert out["w"].tolist() == [[0.0, 1.0, 2.0], [1.0, 0.0, 2.0]]
    assert out["v"].tolist() == [16.0, 0.0, 0.0, -4.0, 0.0, 0.0]


@pytest.mark.parametrize("method", ["sce(base, [a, b, c], select_topk=0.4)", "ramplus_tl(base, [a, b, c])",
                                    "arcee_fusion(base, a)"])
def test_methods_do_not_depend_on_chunk_size(tmp_path, method):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(12, 9, generator=g)
    inputs = {"base": base, **{k: base + 0.01 * torch.randn(12, 9, generator=g).round(decimals=1) for k in "abc"}}
    for k, v in inputs.items():
        (tmp_path / k).mkdir()
        save_file({"w": v, "v": v[0].clone()}, str(tmp_path / k / "model.safetensors"))
    spec = tmp_path / "m.ml"
    spec.write_text("".join(f'{k} = model("{k}")\n' for k in inputs) + f"output {method}\n")
    outs = [load_folder(run(spec, tmp_path / f"out{chunk}", RunOptions(chunk=chunk, dtype="fp32")))
            for chunk in (9, 40, 1 << 20)]  # rows of 9 entries: 1 row, 4 rows, all at once
    for o in outs[1:]:
        assert all(torch.equal(o[k], outs[0][k]) for k in o)


# ---- against mergekit ----------------------------------------------------------------------------

SPEC_HEAD = 'base = model("base")\na = model("ft0")\nb = model("ft1")\nc = model("ft2")\n'


@pytest.fixture(scope="module")
def fam(tmp_path_factory) -> Path:
    require_mergekit()
    return make_family(tmp_path_factory.mktemp("selection_family"), 3)


def mergekit_config(fam: Path, method: str, n: int = 3, **parameters) -> dict:
    config = {"merge_method": method, "base_model": str(fam / "base"),
              "models": [{"model": str(fam / f"ft{i}")} for i in range(n)]}
    if parameters:
        config["parameters"] = parameters
    return config


def both(fam: Path, tmp_path: Path, config: dict, expr: str) -> tuple[dict, dict]:
    theirs = run_mergekit(config, tmp_path / "mergekit")
    ours = run_mergelang(SPEC_HEAD + f"output {expr}\n", fam, tmp_path / "ours")
    return ours, theirs


def variance_ties(fam: Path, select_topk: float) -> dict[str, torch.Tensor]:
    """Per tensor, the entries whose variance equals the k-th largest where the entries of that value
    straddle the cut: there mergekit's torch.topk keeps an arbitrary subset, we the lowest indices."""
    base = load_folder(fam / "base")
    fts = [load_folder(fam / f"ft{i}") for i in range(3)]
    ties = {}
    for name, b in base.items():
        var = torch.var(torch.stack([f[name].float() - b.float() for f in fts]), dim=0, unbiased=False)
        k = int(torch.count_nonzero(var) * select_topk)
        ties[name] = torch.zeros(var.shape, dtype=torch.bool)
        if k > 0:
            t = torch.topk(var.flatten(), k).values[-1]
            if int((var > t).sum()) + int((var == t).sum()) > k:
                ties[name] = var == t
    return ties


@pytest.mark.parametrize("select_topk", [1.0, 0.5, 0.1, 0.01])  # 0.01: k = 0 on the small tensors
def test_sce_matches_mergekit(fam, tmp_path, select_topk):
    config = mergekit_config(fam, "sce", select_topk=select_topk)
    ours, theirs = both(fam, tmp_path, config, f"sce(base, [a, b, c], select_topk={select_topk})")
    ties = variance_ties(fam, select_topk)
    tied = sum(int(t.sum()) for t in ties.values())
    assert tied < 100  # a few entries of the coarsely quantized norm weights
    for name, t in ties.items():  # where mergekit's unstable top-k chose among equal variances
        theirs[name] = torch.where(t, ours[name], theirs[name])
    assert_close_ulp(ours, theirs)


def test_sce_int8_mask_changes_nothing(fam, tmp_path):
    ours, theirs = both(fam, tmp_path, mergekit_config(fam, "sce", select_topk=1.0, int8_mask=True),
                        "sce(base, [a, b, c], int8_mask=true)")
    assert_close_ulp(ours, theirs)


@pytest.mark.parametrize("epsilon", [1e-5, 3e-3])
def test_ram_matches_mergekit(fam, tmp_path, epsilon):
    ours, theirs = both(fam, tmp_path, mergekit_config(fam, "ram", epsilon=epsilon),
                        f"ram(base, [a, b, c], epsilon={epsilon})")
    assert_close_ulp(ours, theirs, max_ulp=0)


@pytest.mark.parametrize("params", [{}, {"epsilon": 3e-3, "r": 0.5, "alpha": 0.6}])
def test_ramplus_tl_matches_mergekit(fam, tmp_path, params):
    args = "".join(f", {k}={v}" for k, v in params.items())
    ours, theirs = both(fam, tmp_path, mergekit_config(fam, "ramplus_tl", **params),
                        f"ramplus_tl(base, [a, b, c]{args})")
    assert_close_ulp(ours, theirs, max_ulp=0)
    if params:  # the unique entries were scaled: ramplus_tl differs from ram here
        plain = run_mergelang(SPEC_HEAD + f"output ram(base, [a, b, c], epsilon={params['epsilon']})\n", fam,
                              tmp_path / "ram")
        assert any(not torch.equal(plain[k], ours[k]) for k in ours)


def test_arcee_fusion_matches_mergekit(fam, tmp_path):
    ours, theirs = both(fam, tmp_path, mergekit_config(fam, "arcee_fusion", n=1), "arcee_fusion(base, a)")
    assert_close_ulp(ours, theirs, max_ulp=0)
    base = load_folder(fam / "base")
    taken = sum(int((ours[k] != base[k]).sum()) for k in ours) / sum(v.numel() for v in ours.values())
    assert 0.01 < taken < 0.5  # the outlier fence takes a minority of the entries


# ---- mergelang check -----------------------------------------------------------------------------


def check(fam: Path, body: str) -> str:
    spec = fam / "check.ml"
    spec.write_text(SPEC_HEAD + body)
    result = CliRunner().invoke(main, ["check", str(spec)], catch_exceptions=False)
    assert result.exit_code != 0
    return result.output


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_family(tmp_path_factory.mktemp("selection_check"), 3)


@pytest.mark.parametrize("call, keyword, hint", [
    ("sce(base, [a, b], select_top=0.5)", "select_top", "select_topk"),
    ("ram(base, [a, b], eps=0.1)", "eps", "epsilon"),
    ("ramplus_tl(base, [a, b], alhpa=0.1)", "alhpa", "alpha"),
    ("arcee_fusion(base, a, weight=0.5)", "weight", "base, other"),
])
def test_check_rejects_unknown_parameters(tiny, call, keyword, hint):
    out = check(tiny, f"output {call}\n")
    name = call.split("(")[0]
    col = len("output ") + call.index(keyword) + 1
    assert f"`{name}` has no parameter `{keyword}`" in out
    assert f"check.ml:5:{col}" in out and hint in out


@pytest.mark.parametrize("call, message", [
    ("sce(base, [a, b], select_topk=1.5)", "`density` of `nonzero_topk_cutoff` must be in [0, 1], got 1.5"),
    ("sce(base, [a, b], select_topk=-0.5)", "`density` of `nonzero_topk_cutoff` must be in [0, 1], got -0.5"),
    ("ram(base, [a, b], epsilon=-1)", "`epsilon` of `nonzero_mask` must be >= 0, got -1"),
    ("ramplus_tl(base, [a, b], epsilon=-1)", "`epsilon` of `nonzero_mask` must be >= 0, got -1"),
    ("ramplus_tl(base, [a, b], alpha=-0.5)", "`max` of `clamp` must be >= min (0), got -0.5"),
])
def test_check_rejects_out_of_range_values(tiny, call, message):
    out = check(tiny, f"output {call}\n")
    assert message in out
    assert "-->" in out and "out of range" in out


def test_check_points_range_errors_at_the_users_call(tiny):
    out = check(tiny, "output sce(base, [a, b], select_topk=1.5)\n")
    assert "check.ml:5:" in out


def test_check_rejects_wrong_list_shapes(tiny):
    out = check(tiny, "output sce(base, [a, b, c], select_topk=[0.5, 0.5])\n")
    assert "lists of different lengths" in out and "3 and 2" in out and "check.ml:5:8" in out
    out = check(tiny, "output arcee_fusion(base, [a, b])\n")
    assert "the output must be one tensor, found a list of 2" in out and "check.ml:5:8" in out
