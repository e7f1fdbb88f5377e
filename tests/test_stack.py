"""Layer stacking (`layer_range`, `stack`): mergekit's `slices` on tiny Llamas, hand-checked cases, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from mergelang.cli import main
from mergelang.demo import TINY_LLAMA
from oracle import assert_close_ulp, load_folder, make_family, run_mergekit, run_mergelang, run_tensors

LAYERS = 6


@pytest.fixture(scope="module")
def six(tmp_path_factory) -> Path:
    """base/, ft0/, ft1/: 6-layer tiny Llamas whose fine-tunes differ from the base clearly."""
    return make_family(tmp_path_factory.mktemp("six"), 2, delta_std=0.02,
                       config={**TINY_LLAMA, "num_hidden_layers": LAYERS})


def num_layers(folder: Path) -> int:
    return json.loads((folder / "config.json").read_text())["num_hidden_layers"]


def compare_with_mergekit(six: Path, tmp_path: Path, config: dict, spec: str) -> dict:
    theirs = run_mergekit(config, tmp_path / "mk")
    ours = run_mergelang(spec, six, tmp_path / "ml")
    assert sorted(ours) == sorted(theirs)
    assert_close_ulp(ours, theirs)
    assert num_layers(tmp_path / "ml") == num_layers(tmp_path / "mk")
    return ours


# ---- against mergekit ----------------------------------------------------------------------------


def test_passthrough_frankenmerge_matches_mergekit(six, tmp_path):
    """mergekit's examples/orcamini-platy-44layer.yml, scaled down: overlapping ranges of two models."""
    config = {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(six / "ft0"), "layer_range": [0, 4]}]},
        {"sources": [{"model": str(six / "ft1"), "layer_range": [2, 6]}]},
    ]}
    spec = 'a = model("ft0")\nb = model("ft1")\noutput stack(layer_range(a, 0, 4), layer_range(b, 2, 6))\n'
    ours = compare_with_mergekit(six, tmp_path, config, spec)
    assert num_layers(tmp_path / "ml") == 8
    # Independently: layer 5 of the output is layer 3 of ft1; the final norm is ft1's, the embedding ft0's.
    ft0, ft1 = load_folder(six / "ft0"), load_folder(six / "ft1")
    assert torch.equal(ours["model.layers.5.mlp.up_proj.weight"], ft1["model.layers.3.mlp.up_proj.weight"])
    assert torch.equal(ours["model.layers.3.self_attn.q_proj.weight"], ft0["model.layers.3.self_attn.q_proj.weight"])
    assert torch.equal(ours["model.embed_tokens.weight"], ft0["model.embed_tokens.weight"])
    assert torch.equal(ours["model.norm.weight"], ft1["model.norm.weight"])
    assert torch.equal(ours["lm_head.weight"], ft1["lm_head.weight"])


GRADIENT_T = {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                    {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
                    {"value": 0.5}]}
GRADIENT_T_SPEC = ('match tensor { "self_attn" => layers(0, 0.5, 0.3, 0.7, 1), '
                   '"mlp" => layers(1, 0.5, 0.7, 0.3, 0), _ => 0.5 }')


def test_gradient_slerp_matches_mergekit(six, tmp_path):
    """mergekit's examples/gradient-slerp.yml: one slice of two whole models, `t` gradients with filters."""
    config = {"merge_method": "slerp", "base_model": str(six / "ft0"), "parameters": GRADIENT_T, "slices": [
        {"sources": [{"model": str(six / "ft0"), "layer_range": [0, LAYERS]},
                     {"model": str(six / "ft1"), "layer_range": [0, LAYERS]}]}]}
    spec = (f'a = model("ft0")\nb = model("ft1")\n'
            f'output slerp(layer_range(a, 0, 6), layer_range(b, 0, 6), t={GRADIENT_T_SPEC})\n')
    compare_with_mergekit(six, tmp_path, config, spec)


def test_two_slices_with_gradients_inside_each_match_mergekit(six, tmp_path):
    """Gradients interpolate over each slice's own layers; sources of a slice have their own ranges."""
    config = {"merge_method": "slerp", "base_model": str(six / "ft0"), "parameters": GRADIENT_T, "slices": [
        {"sources": [{"model": str(six / "ft0"), "layer_range": [0, 4]},
                     {"model": str(six / "ft1"), "layer_range": [1, 5]}]},
        {"sources": [{"model": str(six / "ft0"), "layer_range": [3, 6]},
                     {"model": str(six / "ft1"), "layer_range": [2, 5]}]}]}
    spec = (f'a = model("ft0")\nb = model("ft1")\nt = {GRADIENT_T_SPEC}\n'
            'output stack(slerp(layer_range(a, 0, 4), layer_range(b, 1, 5), t=t),\n'
            '             slerp(layer_range(a, 3, 6), layer_range(b, 2, 5), t=t))\n')
    compare_with_mergekit(six, tmp_path, config, spec)
    assert num_layers(tmp_path / "ml") == 7


def test_merge_inside_one_slice_matches_mergekit(six, tmp_path):
    """A linear merge (with a per-source weight gradient) in the first slice, a plain range after it."""
    config = {"merge_method": "linear", "slices": [
        {"sources": [{"model": str(six / "ft0"), "layer_range": [0, 3], "parameters": {"weight": [0.2, 0.8]}},
                     {"model": str(six / "ft1"), "layer_range": [2, 5], "parameters": {"weight": 0.5}}]},
        {"sources": [{"model": str(six / "base"), "layer_range": [1, 6], "parameters": {"weight": 1.0}}]}]}
    spec = ('a = model("ft0")\nb = model("ft1")\nbase = model("base")\n'
            'output stack(linear([layer_range(a, 0, 3), layer_range(b, 2, 5)], weights=[layers(0.2, 0.8), 0.5]),\n'
            '             layer_range(base, 1, 6))\n')
    ours = compare_with_mergekit(six, tmp_path, config, spec)
    assert num_layers(tmp_path / "ml") == 8
    # The embedding is the first slice's merge at t = 0: (0.2·ft0 + 0.5·ft1) / 0.7.
    ft0, ft1 = load_folder(six / "ft0"), load_folder(six / "ft1")
    name = "model.embed_tokens.weight"
    expected = ((0.2 * ft0[name].float() + 0.5 * ft1[name].float()) / 0.7).to(torch.bfloat16)
    assert_close_ulp({name: ours[name]}, {name: expected})


# ---- hand-checked --------------------------------------------------------------------------------


def hand_models() -> dict[str, dict[str, torch.Tensor]]:
    """x and y with 3 layers; every tensor is a constant that says where it comes from."""
    def model(tag: float) -> dict[str, torch.Tensor]:
        out = {"model.embed_tokens.weight": torch.full((2, 2), tag + 0.5), "model.norm.weight": torch.full((2,), tag + 0.25)}
        for i in range(3):
            out[f"model.layers.{i}.w"] = torch.full((2, 2), tag + i)
        return out
    return {"x": model(10.0), "y": model(20.0)}


def values(out: dict[str, torch.Tensor]) -> dict[str, float]:
    for name, t in out.items():
        assert torch.all(t == t.reshape(-1)[0]), name
    return {name: t.reshape(-1)[0].item() for name, t in out.items()}


def test_which_source_tensor_lands_where(tmp_path):
    spec = 'x = model("x")\ny = model("y")\noutput stack(layer_range(x, 1, 3), layer_range(y, 0, 2), x)\n'
    assert values(run_tensors(spec, hand_models(), tmp_path)) == {
        "model.layers.0.w": 11, "model.layers.1.w": 12,  # x's layers 1, 2
        "model.layers.2.w": 20, "model.layers.3.w": 21,  # y's layers 0, 1
        "model.layers.4.w": 10, "model.layers.5.w": 11, "model.layers.6.w": 12,  # all of x
        "model.embed_tokens.weight": 10.5,  # the first part's
        "model.norm.weight": 10.25,  # the last part's (x again)
    }


def test_layers_interpolate_over_each_part_and_outside_tensors_take_t0(tmp_path):
    spec = ('x = model("x")\ny = model("y")\n'
            'output stack(layers(0, 1) * layer_range(x, 0, 3), layers(10, 20) * layer_range(y, 1, 3))\n')
    assert values(run_tensors(spec, hand_models(), tmp_path)) == {
        "model.layers.0.w": 0 * 10, "model.layers.1.w": 0.5 * 11, "model.layers.2.w": 1 * 12,
        "model.layers.3.w": 10 * 21, "model.layers.4.w": 20 * 22,
        "model.embed_tokens.weight": 0 * 10.5,  # first part, t = 0
        "model.norm.weight": 10 * 20.25,  # last part, t = 0
    }


def test_layer_range_alone_and_nested(tmp_path):
    spec = 'x = model("x")\noutput layer_range(layer_range(x, 1, 3), 1, 2) + layers(5, 7)\n'
    assert values(run_tensors(spec, hand_models(), tmp_path)) == {
        "model.layers.0.w": 12 + 7,  # a one-layer stack has t = 1, as in mergekit
        "model.embed_tokens.weight": 10.5 + 5, "model.norm.weight": 10.25 + 5,
    }


def test_nested_stacks_and_a_list_of_ranges(tmp_path):
    """`layer_range([x, y], ...)` broadcasts; a stack inside a stack is a part whose parts are innermost."""
    spec = ('x = model("x")\ny = model("y")\n'
            'output stack(stack(layer_range([x, y], 1, 3)), layers(1, 3) * stack(layer_range(y, 0, 1), layer_range(x, 0, 2)))\n')
    assert values(run_tensors(spec, hand_models(), tmp_path)) == {
        "model.layers.0.w": 11, "model.layers.1.w": 12, "model.layers.2.w": 21, "model.layers.3.w": 22,
        # the `layers` multiplies a 3-layer part (its inner parts do not matter to it): t = 0, 0.5, 1
        "model.layers.4.w": 1 * 20, "model.layers.5.w": 2 * 10, "model.layers.6.w": 3 * 11,
        "model.embed_tokens.weight": 10.5, "model.norm.weight": 1 * 10.25,
    }


def test_match_inside_a_part_sees_the_output_name(tmp_path):
    """As mergekit's `filter` does: the output layer 2 is y's layer 0, and "layers.2." matches it."""
    spec = ('x = model("x")\ny = model("y")\n'
            'output stack(layer_range(x, 0, 2), layer_range(match tensor { "layers.2." => 2 * y, _ => y }, 0, 2))\n')
    got = values(run_tensors(spec, hand_models(), tmp_path))
    assert got["model.layers.2.w"] == 2 * 20 and got["model.layers.3.w"] == 21


def test_stacked_output_runs_in_transformers_like_a_hand_assembled_model(six, tmp_path):
    transformers = pytest.importorskip("transformers")
    spec = 'a = model("ft0")\nb = model("base")\noutput stack(layer_range(a, 0, 4), layer_range(b, 2, 6))\n'
    run_mergelang(spec, six, tmp_path / "out")
    merged = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert merged.config.num_hidden_layers == 8 and len(merged.model.layers) == 8

    a, b = load_folder(six / "ft0"), load_folder(six / "base")
    state = {k: v for k, v in a.items() if ".layers." not in k}
    state["model.norm.weight"], state["lm_head.weight"] = b["model.norm.weight"], b["lm_head.weight"]
    for k, (src, i) in enumerate([(a, 0), (a, 1), (a, 2), (a, 3), (b, 2), (b, 3), (b, 4), (b, 5)]):
        prefix = f"model.layers.{i}."
        state.update({f"model.layers.{k}." + n[len(prefix):]: v for n, v in src.items() if n.startswith(prefix)})
    config = transformers.LlamaConfig(**{**TINY_LLAMA, "num_hidden_layers": 8})
    by_hand = transformers.LlamaForCausalLM(config).to(torch.float32)
    by_hand.load_state_dict({k: v.float() for k, v in state.items()})
    ids = torch.tensor([[1, 5, 9, 33, 70, 2]])
    with torch.no_grad():
        assert torch.equal(merged(ids).logits, by_hand(ids).logits)


# ---- errors --------------------------------------------------------------------------------------


def check_output(folder: Path, text: str) -> str:
    spec = folder / "spec.ml"
    spec.write_text(text)
    result = CliRunner().invoke(main, ["check", str(spec)])
    assert result.exit_code == 1, result.output
    return result.output.replace(str(spec), "spec.ml")


HEAD = 'a = model("ft0")\nb = model("ft1")\n'


@pytest.mark.parametrize("expr, expected", [
    ("stack(layer_range(a, 0, 4), layer_range(b, 2, 9))",
     "error[E006]: END of `layer_range` is 9, but `b` has 6 layers\n  --> spec.ml:3:54"),
    ("layer_range(a, 4, 4)", "error[E006]: `layer_range` needs START < END, got START=4 and END=4\n  --> spec.ml:3:8"),
    ("layer_range(a, -1, 4)", "error[E006]: START of `layer_range` must be >= 0, got -1\n  --> spec.ml:3:23"),
    ("layer_range(a, 0, 2.5)", "error[E005]: END of `layer_range` must be a whole number, found 2.5\n  --> spec.ml:3:26"),
    ("layer_range(a, 0, b)", "error[E005]: END of `layer_range` must be a whole number, found a tensor\n  --> spec.ml:3:26"),
    ("a + layer_range(2, 0, 4)",
     "error[E005]: `layer_range` needs a tensor (a model or an expression of models), found a number\n  --> spec.ml:3:24"),
    ("stack(a, 3)",
     "error[E005]: each part of `stack` must be a tensor (a model or an expression of models), found a number\n"
     "  --> spec.ml:3:17"),
    ("a + stack()", "error[E003]: `stack` needs at least one part\n  --> spec.ml:3:12"),
    ("layer_range(a, 0, 4) + layer_range(b, 0, 3)",
     "error[E009]: the operands of `add` have different numbers of layers: 4 and 3\n  --> spec.ml:3:8"),
    ("stack(layer_range(a, 0, 2), model_magnitude_threshold(a, density=0.5))",
     "error[E005]: `model_magnitude_threshold` is a statistic over every tensor of a model"),
])
def test_errors(six, expr, expected):
    out = check_output(six, HEAD + f"output {expr}\n")
    assert expected in out, out


def test_layers_in_layer_range_bounds_is_refused(six):
    out = check_output(six, HEAD + "output layer_range(a, 0, layers(2, 4))\n")
    assert "error[E005]: END of `layer_range` must be a whole number, found a per-tensor number\n  --> spec.ml:3:26" in out


def test_parts_with_different_shapes_outside_the_layers(six, tmp_path):
    make_family(tmp_path, 0, config={**TINY_LLAMA, "hidden_size": 16, "head_dim": 4})
    spec = tmp_path / "spec.ml"
    spec.write_text(f'a = model("{six / "ft0"}")\nsmall = model("base")\n'
                    'output stack(layer_range(a, 0, 2), small)\n')
    result = CliRunner().invoke(main, ["check", str(spec)])
    assert result.exit_code == 1
    assert ("error[E009]: the parts of `stack` have different shapes outside the layer stack: "
            "`lm_head.weight` is [128, 32] in `a` and [128, 16] in `small`") in result.output
    assert f"{spec}:3:8" in result.output


def test_layer_types_follow_their_source_layers(tmp_path):
    """Configs with a per-layer list (Qwen2, Gemma: `layer_types`) get it rebuilt from each source layer."""
    kinds = [f"kind{i}" for i in range(LAYERS)]
    make_family(tmp_path, 1, config={**TINY_LLAMA, "num_hidden_layers": LAYERS, "layer_types": kinds})
    spec = 'a = model("base")\nb = model("ft0")\noutput stack(layer_range(a, 4, 6), layer_range(b, 0, 3))\n'
    run_mergelang(spec, tmp_path, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_hidden_layers"] == 5
    assert config["layer_types"] == ["kind4", "kind5", "kind0", "kind1", "kind2"]


def test_no_warning_for_layers_a_stack_leaves_out(six, tmp_path):
    """The deeper model's layers 2..5 are not in the 2-layer reference, but a stack picks its layers."""
    make_family(tmp_path, 0)  # a 2-layer base
    spec = tmp_path / "short.ml"
    spec.write_text(f'a = model("base")\nb = model("{six / "ft1"}")\n'
                    'output stack(layer_range(a, 0, 1), layer_range(b, 5, 6))\n')
    result = CliRunner().invoke(main, ["check", str(spec)])
    assert result.exit_code == 0 and "warning" not in result.output, result.output
    assert "ok: 21 output tensors" in result.output  # 2 layers of 9 tensors, embedding, norm, head


def test_explain_shows_which_source_layer_a_load_reads(family, monkeypatch):
    from test_lower import REPO, _bind, explain
    from test_parse import GOLDEN, check_golden

    args = ["examples/frankenmerge.ml", "--tensor", "model.layers.3.mlp.up_proj.weight", *_bind(family)]
    check_golden(GOLDEN / "explain" / "example_frankenmerge_layer3_mlp.txt", explain(args, REPO, family, monkeypatch))
