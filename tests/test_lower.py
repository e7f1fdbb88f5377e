"""Lowering semantics against hand-built graphs, per-tensor specialization against hand-computed
numbers, check-time diagnostics, and golden `mergelang explain` output.

Nodes are interned, so an expected graph built here with `Node(...)` is the very object that lowering
returns when (and only when) the two are structurally equal. The explain goldens live in
tests/golden/explain and are rewritten with MERGELANG_UPDATE_GOLDEN=1 (see tests/test_parse.py).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from mergelang.cli import main
from mergelang.check import build_plan
from mergelang.diagnostics import MergelangError
from mergelang.graph import Node, const, render, walk, with_random_key
from mergelang.lower import lower
from mergelang.optimize import optimize
from mergelang.parse import parse
from mergelang.resources import stdlib_files
from mergelang.specialize import LayerInfo, specialize
from test_parse import GOLDEN, check_golden

HEADER = 'base = model("base")\nft0 = model("ft0")\nft1 = model("ft1")\n'
BASE, FT0, FT1 = (Node("load", (), {"model": m}) for m in ("base", "ft0", "ft1"))


def lowered(body: str, folder: Path | None = None):
    return lower(parse(HEADER + body, name="spec.ml", folder=folder))


def output(body: str) -> Node:
    return lowered(body).output


def errors(body: str) -> list:
    with pytest.raises(MergelangError) as info:
        lowered(body)
    return info.value.diagnostics


def sub(a, b):
    return Node("sub", [a, b])


def mul(a, b):
    return Node("mul", [a, b])


def add(a, b):
    return Node("add", [a, b])


def c(value: float) -> Node:
    return const(value)


def dare(x: Node, p: float, seed: int = 0) -> Node:
    return with_random_key(Node("dare", [x, c(p), c(seed)]))


# ---- lists broadcast --------------------------------------------------------------------------


def test_list_minus_tensor_gives_one_sub_per_item():
    out = output("output avg([ft0, ft1] - base)\n")
    assert out is Node("avg", [sub(FT0, BASE), sub(FT1, BASE)])
    assert [n for n in walk(out) if n.op == "sub"] == [sub(FT0, BASE), sub(FT1, BASE)]


def test_tensor_minus_list_keeps_the_order_of_operands():
    assert output("output sum(base - [ft0, ft1])\n") is Node("sum", [sub(BASE, FT0), sub(BASE, FT1)])


def test_list_times_list_zips():
    out = output("output sum([0.25, 0.75] * [ft0, ft1])\n")
    assert out is Node("sum", [mul(c(0.25), FT0), mul(c(0.75), FT1)])


def test_scalar_times_list_and_negated_list():
    out = output("output avg(-(0.5 * [ft0, ft1]))\n")
    assert out is Node("avg", [Node("neg", [mul(c(0.5), FT0)]), Node("neg", [mul(c(0.5), FT1)])])


def test_list_through_a_primitive_broadcasts():
    out = output("output avg(dare([ft0, ft1] - base, p=0.5))\n")
    assert out is Node("avg", [dare(sub(FT0, BASE), 0.5), dare(sub(FT1, BASE), 0.5)])


def test_list_parameter_pairs_with_list_input():
    out = output("output avg(dare([ft0, ft1] - base, p=[0.1, 0.2]))\n")
    assert out is Node("avg", [dare(sub(FT0, BASE), 0.1), dare(sub(FT1, BASE), 0.2)])


def test_list_length_mismatch_is_reported_at_the_shorter_list():
    [d] = errors("output sum([ft0, ft1] * [1, 2, 3])\n")
    assert d.code == "E013"
    assert d.message == "lists of different lengths in `*`: 2 and 3"
    assert (d.span.line, d.span.col, d.span.end_col) == (4, 25, 34)


# ---- functions are inlined ----------------------------------------------------------------------


BLEND = "def blend(a, b, t=0.5) = (1 - t) * a + t * b\n"


def blend(a: Node, b: Node, t: float) -> Node:
    return add(mul(sub(c(1), c(t)), a), mul(c(t), b))


def test_def_with_default():
    assert output(BLEND + "output blend(ft0, ft1)\n") is blend(FT0, FT1, 0.5)


def test_def_with_keyword_arguments_in_any_order():
    out = output(BLEND + "output blend(t=0.25, b=ft1, a=ft0)\n")
    assert out is blend(FT0, FT1, 0.25)


def test_def_positional_default_overridden():
    assert output(BLEND + "output blend(ft0, ft1, 0.75)\n") is blend(FT0, FT1, 0.75)


def test_def_parameters_shadow_global_names():
    assert output("def twice(base) = base * 2\noutput twice(ft0)\n") is mul(FT0, c(2))


def test_def_calling_def():
    body = BLEND + "def halfway(x, y) = blend(x, y)\noutput halfway(ft1, ft0)\n"
    assert output(body) is blend(FT1, FT0, 0.5)


def test_nested_calls_of_the_same_def_are_not_recursion():
    assert output(BLEND + "output blend(blend(ft0, ft1), base)\n") is blend(blend(FT0, FT1, 0.5), BASE, 0.5)


# ---- common subexpressions ----------------------------------------------------------------------


def test_identical_dare_expressions_are_one_node():
    out = output("x = dare(ft0 - base, p=0.9)\ny = dare(ft0 - base, p=0.9)\noutput avg(x, y)\n")
    assert out.args[0] is out.args[1] is dare(sub(FT0, BASE), 0.9)
    assert len([n for n in walk(out) if n.op == "dare"]) == 1


def test_an_explicit_seed_gives_another_dare_node():
    out = output("output avg(dare(ft0 - base, p=0.9), dare(ft0 - base, p=0.9, seed=1))\n")
    first, second = out.args
    assert first is dare(sub(FT0, BASE), 0.9)
    assert second is dare(sub(FT0, BASE), 0.9, seed=1)
    assert first is not second
    assert first.attr("key") != second.attr("key")
    assert first.args[0] is second.args[0]  # the delta itself is shared


def test_seed_zero_written_out_is_the_default():
    out = output("output avg(dare(ft0 - base, p=0.9), dare(ft0 - base, p=0.9, seed=0))\n")
    assert out.args[0] is out.args[1]


def test_same_expression_through_a_def_is_shared():
    body = "def delta(m) = dare(m - base, p=0.5)\noutput avg(delta(ft0), dare(ft0 - base, p=0.5))\n"
    out = output(body)
    assert out.args[0] is out.args[1]


# ---- optimization --------------------------------------------------------------------------------


def test_constant_folding():
    out = output("output (1 + 1) / 4 * ft0\n")
    assert out is mul(Node("div", [add(c(1), c(1)), c(4)]), FT0)
    assert optimize(out) is mul(c(0.5), FT0)


@pytest.mark.parametrize("expr", ["ft0 * 1", "1 * ft0", "ft0 / 1", "ft0 - 0", "--ft0", "avg(ft0)", "sum(ft0)",
                                  "dare(ft0, p=0)", "ft0 * (3 - 2)", "avg([ft0]) * 1"])
def test_exact_simplifications(expr: str):
    assert optimize(output(f"output {expr}\n")) is FT0


@pytest.mark.parametrize("expr, kept", [
    ("ft0 + 0", add(FT0, c(0))),  # -0.0 + 0 is +0.0
    ("0 + ft0", add(c(0), FT0)),
    ("ft0 * 0", mul(FT0, c(0))),  # inf * 0 is nan
    ("ft0 - ft0", sub(FT0, FT0)),
    ("ft0 / 2", Node("div", [FT0, c(2)])),  # not rewritten as a multiplication by 0.5
])
def test_inexact_rewrites_are_not_made(expr: str, kept: Node):
    assert optimize(output(f"output {expr}\n")) is kept


# ---- the stdlib ---------------------------------------------------------------------------------


def weighted(*args, weights, normalize=False):
    return Node("weighted_sum", [*args, *map(c, weights), c(1.0 if normalize else 0.0)])


def test_task_arithmetic_lowers_to_its_formula():
    out = output("output task_arithmetic(base, [ft0, ft1], weights=[0.3, 0.7])\n")
    deltas = weighted(sub(FT0, BASE), sub(FT1, BASE), weights=[0.3, 0.7])
    assert out is add(BASE, mul(c(1), deltas))
    assert optimize(out) is add(BASE, deltas)


def test_task_arithmetic_with_lambda():
    out = optimize(output("output task_arithmetic(base, [ft0], weights=[1], lambda=0.5)\n"))
    assert out is add(BASE, mul(c(0.5), weighted(sub(FT0, BASE), weights=[1])))


def test_task_arithmetic_rendered():
    out = optimize(output("output task_arithmetic(base, [ft0, ft1], weights=[0.3, 0.7])\n"))
    assert render(out) == "\n".join([
        "%0 = load base",
        "%1 = load ft0",
        "%2 = sub %1 %0",
        "%3 = load ft1",
        "%4 = sub %3 %0",
        "%5 = weighted_sum %2 %4 weights=[0.3, 0.7] normalize=false",
        "%6 = add %0 %5",
        "output = %6",
    ])


# ---- per-tensor values ----------------------------------------------------------------------------


MATCH = """\
t = match tensor {
    "self_attn" => 0.2,
    "model.layers.*.mlp.*" => layers(0.5, 0.9),
    "layers.*.mlp.*" => 3,
    "mlp" => 7,
    _ => 0.5
}
output t * ft0
"""


def weight_for(graph: Node, tensor: str, num_layers: int) -> float:
    """The number that multiplies ft0 once the graph is specialized for `tensor` and folded."""
    out = optimize(specialize(graph, tensor, LayerInfo(num_layers)))
    if out is FT0:  # mul(1, ft0) simplified
        return 1.0
    assert out.op == "mul" and out.args[1] is FT0 and out.args[0].op == "const", out
    return out.args[0].attr("value")


@pytest.mark.parametrize("tensor, expected", [
    ("model.layers.0.self_attn.q_proj.weight", 0.2),  # substring
    ("model.layers.2.self_attn.o_proj.weight", 0.2),
    ("model.layers.0.mlp.up_proj.weight", 0.5),  # glob, layer 0 of 3: t = 0
    ("model.layers.1.mlp.up_proj.weight", 0.7),  # t = 1/2: halfway between 0.5 and 0.9
    ("model.layers.2.mlp.down_proj.weight", 0.9),  # t = 1
    ("layers.1.mlp.up_proj.weight", 3),  # the first glob must match the whole name; the second does
    ("model.mlp_gate.weight", 7),  # no glob matches; "mlp" is a substring
    ("model.embed_tokens.weight", 0.5),  # default arm
    ("lm_head.weight", 0.5),
])
def test_match_tensor_picks_the_first_matching_arm(tensor: str, expected: float):
    assert weight_for(output(MATCH), tensor, num_layers=3) == pytest.approx(expected, abs=1e-12)


def test_a_glob_star_matches_across_dots():
    graph = output('output match tensor { "*norm*" => 1, _ => 2 } * ft0\n')
    assert weight_for(graph, "model.layers.3.post_attention_layernorm.weight", 4) == 1
    assert weight_for(graph, "model.norm.weight", 4) == 1
    assert weight_for(graph, "model.layers.3.mlp.up_proj.weight", 4) == 2


@pytest.mark.parametrize("tensor, num_layers, expected", [
    # layers(0, 1, 4) puts 0 at t=0, 1 at t=1/2, 4 at t=1; t = layer / (num_layers - 1).
    ("model.layers.0.mlp.up_proj.weight", 5, 0.0),
    ("model.layers.1.mlp.up_proj.weight", 5, 0.5),  # t = 1/4: halfway from 0 to 1
    ("model.layers.2.mlp.up_proj.weight", 5, 1.0),  # t = 2/4
    ("model.layers.3.mlp.up_proj.weight", 5, 2.5),  # t = 3/4: halfway from 1 to 4
    ("model.layers.4.mlp.up_proj.weight", 5, 4.0),
    ("model.layers.1.self_attn.q_proj.weight", 4, 1 / 3 * 2),  # t = 1/3: two thirds from 0 to 1
    ("transformer.h.2.attn.c_attn.weight", 3, 4.0),  # GPT-2 names; t = 1
    ("model.embed_tokens.weight", 5, 0.0),  # outside the stack: the first value
    ("model.norm.weight", 5, 0.0),
    ("lm_head.weight", 5, 0.0),
    ("model.layers.0.mlp.up_proj.weight", 1, 4.0),  # a one-layer stack: the last value
    ("model.embed_tokens.weight", 1, 0.0),
])
def test_layers_interpolates_over_the_layer_index(tensor: str, num_layers: int, expected: float):
    graph = output("output layers(0, 1, 4) * ft0\n")
    assert weight_for(graph, tensor, num_layers) == pytest.approx(expected, abs=1e-12)


def test_layers_with_one_value_is_constant():
    graph = output("output layers(0.3) * ft0\n")
    for tensor in ("model.layers.0.mlp.up_proj.weight", "model.layers.7.mlp.up_proj.weight", "lm_head.weight"):
        assert weight_for(graph, tensor, 8) == pytest.approx(0.3)


def test_layers_inside_match_and_arithmetic_on_them():
    graph = output('t = match tensor { "mlp" => layers(0, 1), _ => 0.25 }\noutput (1 - t) * base + t * ft0\n')
    out = optimize(specialize(graph, "model.layers.1.mlp.up_proj.weight", LayerInfo(3)))
    assert out is add(mul(c(0.5), BASE), mul(c(0.5), FT0))
    out = optimize(specialize(graph, "model.embed_tokens.weight", LayerInfo(3)))
    assert out is add(mul(c(0.75), BASE), mul(c(0.25), FT0))


def test_match_arms_of_lists_broadcast():
    graph = output('w = match tensor { "mlp" => [0.1, 0.9], _ => [0.5, 0.5] }\noutput sum(w * [ft0, ft1])\n')
    out = optimize(specialize(graph, "model.layers.0.mlp.up_proj.weight", LayerInfo(2)))
    assert out is Node("sum", [mul(c(0.1), FT0), mul(c(0.9), FT1)])


def test_specialize_leaves_no_per_tensor_node():
    graph = output(MATCH)
    assert {n.op for n in walk(graph)} >= {"match", "layers"}
    for tensor in ("model.layers.1.mlp.up_proj.weight", "lm_head.weight"):
        assert not {n.op for n in walk(specialize(graph, tensor, LayerInfo(3)))} & {"match", "layers"}


# ---- check: diagnostics that need the inputs' headers --------------------------------------------


def check_errors(family: Path, body: str) -> list:
    low = lowered(body, folder=family)
    with pytest.raises(MergelangError) as info:
        build_plan(low).close()
    return [d.render(low.sources) for d in info.value.diagnostics]


def test_parameter_out_of_range(family: Path):
    assert check_errors(family, "output base + dare(ft0 - base, p=1.5)\n") == ["""\
error[E006]: `p` of `dare` must be in [0, 1), got 1.5
  --> spec.ml:4:34
  |
4 | output base + dare(ft0 - base, p=1.5)
  |                                  ^^^ out of range"""]


def test_parameter_out_of_range_for_some_layers(family: Path):
    assert check_errors(family, "output base + dare(ft0 - base, p=layers(0.5, 1.2))\n") == ["""\
error[E006]: `p` of `dare` must be in [0, 1), got 1.2 (for `model.layers.1.input_layernorm.weight`, \
`model.layers.1.mlp.down_proj.weight`, `model.layers.1.mlp.gate_proj.weight` and 6 more)
  --> spec.ml:4:34
  |
4 | output base + dare(ft0 - base, p=layers(0.5, 1.2))
  |                                  ^^^^^^^^^^^^^^^^ out of range"""]


def test_one_bad_parameter_is_one_diagnostic(family: Path):
    found = check_errors(family, "output base + dare(ft0 - base, p=layers(0.1, 0.2), seed=-1)\n")
    assert len(found) == 1


def test_division_by_a_folded_zero_is_an_error(family: Path):
    found = check_errors(family, "output base + ft0 / (2 - 2)\n")
    assert len(found) == 1 and "division by zero" in found[0] and "spec.ml:4:15" in found[0]


def test_constant_division_by_zero_is_one_diagnostic_with_a_position(family: Path):
    found = check_errors(family, "output base + 1 / (2 - 2) * ft0\n")
    assert len(found) == 1 and "spec.ml:4:15" in found[0]


# ---- explain --------------------------------------------------------------------------------------


EXPLAIN = [
    # (golden name, spec in tests/golden/explain, arguments after the spec)
    ("dare", "dare.ml", []),
    ("dare_dot", "dare.ml", ["--dot"]),
    ("folding", "folding.ml", []),
    ("folding_unoptimized", "folding.ml", ["--unoptimized"]),
    ("per_tensor", "per_tensor.ml", []),
    ("per_tensor_layer1_mlp", "per_tensor.ml", ["--tensor", "model.layers.1.mlp.up_proj.weight"]),
    ("per_tensor_embed", "per_tensor.ml", ["--tensor", "model.embed_tokens.weight"]),
    ("task_arithmetic", "task_arithmetic.ml", []),
]


REPO = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((REPO / "examples").glob("*.ml"))


def explain(args: list[str], cwd: Path, family: Path, monkeypatch) -> str:
    """`mergelang explain ARGS` run in `cwd`: stdout, then stderr if any, with machine paths replaced."""
    monkeypatch.chdir(cwd)
    result = CliRunner().invoke(main, ["explain", *args])
    assert result.exit_code == 0, result.output
    text = result.stdout
    if result.stderr:
        text += "--- stderr ---\n" + result.stderr
    text = text.replace(str(family.resolve()), "<models>").replace(str(REPO), "<repo>")
    for path in stdlib_files():
        text = text.replace(str(path), f"<stdlib>/{path.name}")
    return text


@pytest.mark.parametrize("name, spec, args", EXPLAIN, ids=[case[0] for case in EXPLAIN])
def test_explain_golden(family: Path, name: str, spec: str, args: list[str], monkeypatch):
    folder = GOLDEN / "explain"
    shutil.copy(folder / spec, family / spec)
    check_golden(folder / f"{name}.txt", explain([spec, *args], family, family, monkeypatch))


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_explain_example_golden(family: Path, example: Path, monkeypatch):
    """The graph of every examples/*.ml, as `mergelang explain examples/NAME.ml` prints it from the repo."""
    text = explain([f"examples/{example.name}"], REPO, family, monkeypatch)
    check_golden(GOLDEN / "explain" / f"example_{example.stem}.txt", text)


def _bind(family: Path) -> list[str]:
    return [arg for m in ("base", "ft0", "ft1") for arg in ("--model", f"{m}={family / m}")]


def test_explain_example_for_one_tensor(family: Path, monkeypatch):
    args = ["examples/per_tensor.ml", "--tensor", "model.layers.1.mlp.up_proj.weight", *_bind(family)]
    text = explain(args, REPO, family, monkeypatch)
    check_golden(GOLDEN / "explain" / "example_per_tensor_layer1_mlp.txt", text)


def test_explain_lists_the_folders_bound_with_model(family: Path, monkeypatch):
    args = ["examples/per_tensor.ml", "--tensor", "model.embed_tokens.weight", *_bind(family)]
    text = explain(args, REPO, family, monkeypatch)
    assert "  base = model('models/base')  # <models>/base\n" in text


def test_a_missing_grammar_is_reported_as_the_installation_not_the_spec(tmp_path, monkeypatch):
    """A spec that exists, read by an installation without its grammar/ folder: the diagnostic names
    the installation (E007, reinstall), not `spec file not found`."""
    from mergelang import parse, resources
    from mergelang.diagnostics import MergelangError
    from mergelang.lower import lower_file

    spec = tmp_path / "spec.ml"
    spec.write_text('a = model("a")\noutput a\n')
    monkeypatch.setattr(resources, "_PACKAGE", tmp_path / "site-packages" / "mergelang")
    parse._parser.cache_clear()
    try:
        with pytest.raises(MergelangError) as caught:
            lower_file(spec)
    finally:
        parse._parser.cache_clear()  # built again from the real grammar by the next test
    message = caught.value.diagnostics[0].message
    assert "grammar/ folder is missing from the installation" in message and "spec file" not in message
    assert caught.value.diagnostics[0].help == "reinstall mergelang"
