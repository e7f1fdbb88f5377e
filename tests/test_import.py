"""`mergelang import`: mergekit configs translated into specs.

(a) Golden: every example config of mergekit's repository (tests/data/mergekit_examples, verbatim)
    translates to the reviewed spec in tests/golden/import/NAME.ml. After a deliberate change, rewrite
    them with `MERGELANG_UPDATE_GOLDEN=1 python -m pytest tests/test_import.py` and review the diff.
(b) Same tensors: mergekit runs a config on tiny checkpoints, mergelang runs the translated spec, and
    every tensor agrees (within one bf16 ulp, except where the method's own tests show why not).
(c) Errors: diagnostics at the line and column of the key in the YAML file.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from oracle import assert_close_ulp, load_folder, run_mergekit, run_mergelang, ulp_diff
from test_parse import check_golden

from mergelang.cli import main
from mergelang.demo import TINY_LLAMA, make_tiny_llama
from mergelang.importer import METHODS, translate
from mergelang.lower import load_stdlib, lower
from mergelang.parse import parse

EXAMPLES = Path(__file__).parent / "data" / "mergekit_examples"
GOLDEN = Path(__file__).parent / "golden" / "import"


# ---- (a) golden translations -----------------------------------------------------------------------


@pytest.mark.parametrize("config", sorted(EXAMPLES.glob("*.yml")), ids=lambda p: p.stem)
def test_example_configs_translate_to_golden(config):
    spec = translate(config.read_text(encoding="utf-8"), config.name)
    check_golden(GOLDEN / f"{config.stem}.ml", spec)


EXTRA = {
    # slices with a merge inside, slice-level parameters over top-level ones, a per-slice base model
    "slices_with_merges": """
merge_method: slerp
base_model: org/a
slices:
  - sources:
      - {model: org/a, layer_range: [0, 16]}
      - {model: org/b, layer_range: [8, 24]}
    parameters:
      t: [0, 1]
  - sources:
      - {model: org/a, layer_range: [16, 32]}
      - {model: org/b, layer_range: [16, 32]}
    base_model: org/b
  - sources:
      - {model: org/c, layer_range: [30, 32]}
      - {model: org/a, layer_range: [30, 32]}
    base_model: org/c
parameters:
  t:
    - filter: mlp
      value: 0.25
    - value: 0.5
""",
    # output options, a LoRA, a revision, and notes for what mergekit does not use
    "output_options": """
merge_method: dare_linear
base_model: meta-llama/Llama-2-7b-hf@main
models:
  - model: meta-llama/Llama-2-7b-hf@main+someone/llama-lora
    parameters: {weight: 0.6, density: 0.3, t: 0.5}
  - model: lmsys/vicuna-7b-v1.5
    parameters: {weight: 0.4}
parameters:
  density: 0.5
  rescale: false
  densty: 0.9
tokenizer_source: lmsys/vicuna-7b-v1.5
chat_template: "{% for m in messages %}{{ m['content'] }}\\n{% endfor %}"
dtype: float32
out_dtype: bfloat16
""",
}


@pytest.mark.parametrize("name", sorted(EXTRA))
def test_extra_configs_translate_to_golden(name):
    check_golden(GOLDEN / f"extra_{name}.ml", translate(EXTRA[name], f"{name}.yml"))


def test_every_example_is_covered():
    assert {p.stem for p in EXAMPLES.glob("*.yml")} == {
        "arcee_fusion", "bio-merge", "gradient-slerp", "linear", "orcamini-platy-44layer", "ties", "multimerge"}


def test_translations_use_stdlib_parameter_names():
    """Every method the importer knows is a stdlib def taking the keywords it writes."""
    defs, _ = load_stdlib(__import__("mergelang.diagnostics", fromlist=["Reporter"]).Reporter())
    for name, method in METHODS.items():
        assert name in defs, name
        params = {p.name for p in defs[name].params}
        written = {{"weight": "weights"}.get(p, p) for p in method.per_model} | set(method.shared)
        if method.shape == "models,base=":
            written.add("base")
        assert written <= params, (name, written - params)


@pytest.mark.parametrize("golden", sorted(GOLDEN.glob("*.ml")), ids=lambda p: p.stem)
def test_every_golden_is_a_valid_spec(golden):
    """Each translation parses and lowers as it stands (stacking, output options, lora and revisions
    included)."""
    lower(parse(golden.read_text(), name=golden.name))


# ---- (b) the same tensors as mergekit --------------------------------------------------------------

FIVE_LAYERS = {**TINY_LLAMA, "num_hidden_layers": 5}


@pytest.fixture(scope="module")
def fam(tmp_path_factory) -> Path:
    """base, ft0..ft2: tiny float32 Llamas with 5 layers (float32 deltas practically never tie at a
    top-k cut, so TIES keeps the same entries in both tools)."""
    root = tmp_path_factory.mktemp("import_family")
    make_tiny_llama(root / "base", seed=0, config=FIVE_LAYERS, dtype=torch.float32)
    for i in range(3):
        make_tiny_llama(root / f"ft{i}", seed=i + 1, base=root / "base", dtype=torch.float32)
    return root


def rewrite(config: dict, mapping: dict[str, str], root: Path) -> dict:
    """The config with each model id replaced by a tiny checkpoint folder, and `dtype`/`out_dtype`
    removed (run_mergekit computes in float32 and writes bfloat16, as mergelang does with --dtype bf16)."""
    config = copy.deepcopy(config)
    for key in ("dtype", "out_dtype"):
        config.pop(key, None)

    def walk(x):
        if isinstance(x, dict):
            return {k: (str(root / mapping[v]) if k in ("model", "base_model") and isinstance(v, str) and v in mapping
                        else walk(v)) for k, v in x.items()}
        if isinstance(x, list):
            return [walk(v) for v in x]
        return x

    return walk(config)


def both(config: dict, root: Path, tmp: Path, *, extra=("--dtype", "bf16"), seed: int = 0, out_dtype="bfloat16"):
    theirs = run_mergekit({"out_dtype": out_dtype, **config}, tmp / "mk", seed=seed)
    spec = translate(yaml.safe_dump(config, sort_keys=False), "config.yml")
    ours = run_mergelang(spec, root, tmp / "ml", seed=seed, extra=extra)
    return ours, theirs, spec


def example(name: str) -> dict:
    return yaml.safe_load((EXAMPLES / name).read_text())


def assert_linear_close(ours, theirs):
    """mergekit's linear sums with torch.addcmul, which CPUs compute as a fused multiply-add, where
    mergelang rounds each product (see test_methods_task_arithmetic): more than one ulp apart only where
    the sum nearly cancels."""
    assert ours.keys() == theirs.keys()
    for name in ours:
        bad = ulp_diff(ours[name], theirs[name]) > 1
        assert (theirs[name].float()[bad].abs() < 1e-6).all(), name


def test_linear_example_matches_mergekit(fam, tmp_path):
    config = rewrite(example("linear.yml"), {"psmathur/orca_mini_v3_13b": "ft0", "WizardLM/WizardLM-13B-V1.2": "ft1",
                                             "garage-bAInd/Platypus2-13B": "ft2"}, fam)
    ours, theirs, spec = both(config, fam, tmp_path)
    assert "weights=[1.0, 0.3, 0.5]" in spec
    assert_linear_close(ours, theirs)


def test_ties_example_with_gradients_and_filters_matches_mergekit(fam, tmp_path):
    config = rewrite(example("ties.yml"), {"TheBloke/Llama-2-13B-fp16": "base", "psmathur/orca_mini_v3_13b": "ft0",
                                           "garage-bAInd/Platypus2-13B": "ft1", "WizardLM/WizardMath-13B-V1.0": "ft2"},
                     fam)
    ours, theirs, spec = both(config, fam, tmp_path)
    assert "layers(1, 0.7, 0.1)" in spec and '"mlp" => 0.5' in spec
    assert_close_ulp(ours, theirs, max_ulp=1)


def test_bio_merge_example_matches_mergekit(fam, tmp_path):
    config = rewrite(example("bio-merge.yml"), {"mistralai/Mistral-7B-v0.1": "base",
                                                "mistralai/Mistral-7B-Instruct-v0.2": "ft0",
                                                "BioMistral/BioMistral-7B": "ft1"}, fam)
    ours, theirs, _ = both(config, fam, tmp_path)
    assert_close_ulp(ours, theirs, max_ulp=1)


def test_arcee_fusion_example_matches_mergekit(fam, tmp_path):
    config = rewrite(example("arcee_fusion.yml"), {"model_a": "base", "model_b": "ft0"}, fam)
    ours, theirs, _ = both(config, fam, tmp_path)
    assert_close_ulp(ours, theirs, max_ulp=0)


def test_gradient_slerp_in_models_syntax_matches_mergekit(fam, tmp_path):
    """gradient-slerp.yml written with `models:` (its own comment gives this form): t by filter and gradient."""
    config = example("gradient-slerp.yml")
    config["models"] = [{"model": s["model"]} for s in config.pop("slices")[0]["sources"]]
    config = rewrite(config, {"psmathur/orca_mini_v3_13b": "ft0", "garage-bAInd/Platypus2-13B": "ft1"}, fam)
    ours, theirs, spec = both(config, fam, tmp_path)
    assert 'slerp(ft0, ft1, t=match tensor { "self_attn" => layers(0, 0.5, 0.3, 0.7, 1)' in spec.replace("\n", " ")\
        or "layers(0, 0.5, 0.3, 0.7, 1)" in spec
    assert_close_ulp(ours, theirs, max_ulp=1)


PRECEDENCE = """
merge_method: task_arithmetic
base_model: base
models:
  - model: ft0                      # its own weight: a gradient
    parameters:
      weight: [0.2, 1.0]
  - model: ft1                      # a filter with no fallback: other tensors fall through to the top level
    parameters:
      weight:
        - filter: self_attn
          value: -0.4
  - model: ft2                      # nothing of its own: the top level
parameters:
  weight:
    - filter: mlp
      value: [0.9, 0.1]
    - value: 0.3
  normalize: true
  lambda: 0.8
"""


def test_precedence_per_model_over_top_level_matches_mergekit(fam, tmp_path):
    config = rewrite(yaml.safe_load(PRECEDENCE), {"base": "base", "ft0": "ft0", "ft1": "ft1", "ft2": "ft2"}, fam)
    ours, theirs, spec = both(config, fam, tmp_path)
    check_golden(GOLDEN / "precedence.ml", spec.replace(str(fam) + "/", ""))
    assert "normalize=true" in spec and "lambda=0.8" in spec
    assert_close_ulp(ours, theirs, max_ulp=1)


def test_dense_dare_ties_with_density_lists_matches_mergekit(fam, tmp_path):
    """At density 1 the random sparsifier keeps everything (the L1 rescale is exactly 1): bit for bit."""
    config = rewrite({"merge_method": "dare_ties", "base_model": "b",
                      "models": [{"model": m, "parameters": {"weight": w, "density": [1.0, 1.0]}}
                                 for m, w in (("x", 0.6), ("y", 0.4))]}, {"b": "base", "x": "ft0", "y": "ft1"}, fam)
    ours, theirs, spec = both(config, fam, tmp_path)
    assert "density=[layers(1.0, 1.0), layers(1.0, 1.0)]" in spec
    assert_close_ulp(ours, theirs, max_ulp=1)


def test_sparse_dare_ties_density_goes_to_its_model(fam, tmp_path):
    """The random masks differ between the tools, so compare what they imply: with weights [1, 0] the
    output differs from the base exactly where model x's delta was kept, a fraction density_x = 0.3
    (not y's 0.7): both tools within four standard deviations of it."""
    config = rewrite({"merge_method": "dare_ties", "base_model": "b",
                      "models": [{"model": "x", "parameters": {"weight": 1.0, "density": 0.3}},
                                 {"model": "y", "parameters": {"weight": 0.0, "density": 0.7}}]},
                     {"b": "base", "x": "ft0", "y": "ft1"}, fam)
    ours, theirs, _ = both(config, fam, tmp_path, extra=("--dtype", "fp32"), out_dtype="float32")
    base = load_folder(fam / "base")
    for result in (ours, theirs):
        names = [k for k in base if k.endswith("proj.weight")]
        n = sum(base[k].numel() for k in names)
        changed = sum(int((result[k].float() != base[k]).sum()) for k in names) / n
        assert abs(changed - 0.3) < 4 * math.sqrt(0.3 * 0.7 / n), changed


MULTI = """
name: soup
merge_method: linear
models:
  - model: ft0
  - model: ft1
parameters:
  weight: 0.5
---
name: blend
merge_method: slerp
base_model: soup
models:
  - model: ft2
parameters:
  t: [0.2, 0.8]
---
merge_method: ties
base_model: base
models:
  - model: blend
    parameters: {weight: 0.7, density: 0.6}
  - model: ft0
    parameters: {weight: 0.3, density: 0.5}
"""


def test_multi_document_config_matches_mergekit_run_stage_by_stage(fam, tmp_path):
    """mergekit-multi runs each document in turn with the earlier outputs as models; here the
    intermediates are written in float32 so that both compute the same values."""
    docs = list(yaml.safe_load_all(MULTI))
    mapping = {"base": "base", "ft0": "ft0", "ft1": "ft1", "ft2": "ft2"}
    for doc in docs:
        name = doc.pop("name", None)
        config = rewrite(doc, {**mapping, **{k: str(tmp_path / k) for k in ("soup", "blend")}}, fam)
        if name:
            run_mergekit({**config, "out_dtype": "float32"}, tmp_path / name)
        else:
            theirs = run_mergekit(config, tmp_path / "final")
    spec = translate(MULTI, "multi.yml")
    assert "soup = linear([ft0, ft1], weights=[0.5, 0.5])" in spec
    assert "blend = slerp(soup, ft2, t=layers(0.2, 0.8))" in spec
    ours = run_mergelang(spec.replace('model("', f'model("{fam}/'), fam, tmp_path / "ml", extra=("--dtype", "bf16"))
    assert_close_ulp(ours, theirs, max_ulp=1)


def test_orcamini_platy_layer_stacking_matches_mergekit(fam, tmp_path):
    config = example("orcamini-platy-44layer.yml")
    config["slices"][0]["sources"][0]["layer_range"] = [0, 3]
    config["slices"][1]["sources"][0]["layer_range"] = [1, 5]
    config = rewrite(config, {"psmathur/orca_mini_v3_13b": "ft0", "garage-bAInd/Platypus2-13B": "ft1"}, fam)
    ours, theirs, spec = both(config, fam, tmp_path)
    assert "stack(layer_range(ft0, 0, 3), layer_range(ft1, 1, 5))" in spec
    assert_close_ulp(ours, theirs, max_ulp=0)


def test_gradient_slerp_slices_match_mergekit(fam, tmp_path):
    config = example("gradient-slerp.yml")
    for source in config["slices"][0]["sources"]:
        source["layer_range"] = [0, 5]
    config = rewrite(config, {"psmathur/orca_mini_v3_13b": "ft0", "garage-bAInd/Platypus2-13B": "ft1"}, fam)
    ours, theirs, _ = both(config, fam, tmp_path)
    assert_close_ulp(ours, theirs, max_ulp=1)


def test_slices_with_a_merge_inside_and_slice_parameters_match_mergekit(fam, tmp_path):
    config = {"merge_method": "slerp", "base_model": "a",
              "slices": [{"sources": [{"model": "a", "layer_range": [0, 3]}, {"model": "b", "layer_range": [2, 5]}],
                          "parameters": {"t": [0, 1]}},
                         {"sources": [{"model": "a", "layer_range": [3, 5]}, {"model": "b", "layer_range": [0, 2]}]}],
              "parameters": {"t": 0.3}}
    config = rewrite(config, {"a": "ft0", "b": "ft1"}, fam)
    ours, theirs, _ = both(config, fam, tmp_path)
    assert_close_ulp(ours, theirs, max_ulp=1)


def test_out_dtype_matches_mergekit(fam, tmp_path):
    config = rewrite({"merge_method": "task_arithmetic", "base_model": "b",
                      "models": [{"model": "x", "parameters": {"weight": 0.5}}]}, {"b": "base", "x": "ft0"}, fam)
    config.update(dtype="float32", out_dtype="float16")
    ours, theirs, spec = both(config, fam, tmp_path, extra=())
    assert spec.rstrip().endswith('dtype="fp16"')
    assert all(t.dtype == torch.float16 for t in ours.values())
    assert_close_ulp(ours, theirs, max_ulp=1)


def test_tokenizer_source_model_translates_to_a_runnable_option(fam, tmp_path):
    """The tiny models have no tokenizer files (mergekit needs them to apply tokenizer_source), and
    they share one vocabulary, so the tokenizer choice leaves the tensors as without it."""
    config = rewrite({"merge_method": "task_arithmetic", "base_model": "b",
                      "models": [{"model": "x", "parameters": {"weight": 0.5}}]}, {"b": "base", "x": "ft0"}, fam)
    theirs = run_mergekit(config, tmp_path / "mk")
    spec = translate(yaml.safe_dump({**config, "tokenizer_source": config["models"][0]["model"]}), "c.yml")
    assert spec.rstrip().endswith(", tokenizer=ft0")
    ours = run_mergelang(spec, fam, tmp_path / "ml", extra=("--dtype", "bf16"))
    assert_close_ulp(ours, theirs, max_ulp=1)


# ---- translation details ---------------------------------------------------------------------------


def test_model_references_names_revisions_and_loras():
    spec = translate("""
merge_method: task_arithmetic
base_model: org/Llama-2-7B@main
models:
  - model: org/Llama-2-7B@main+someone/my-lora
    parameters: {weight: 1}
  - model: other/llama-2-7b
    parameters: {weight: 1}
  - model: ./local/ties
    parameters: {weight: 1}
""", "c.yml")
    assert 'llama_2_7b = model("org/Llama-2-7B", revision="main")' in spec
    assert "llama_2_7b_my_lora = llama_2_7b + lora(\"someone/my-lora\", base=llama_2_7b)" in spec
    assert 'llama_2_7b_2 = model("other/llama-2-7b")' in spec
    assert 'ties_model = model("./local/ties")' in spec  # a model may not be named like a method
    assert "[llama_2_7b_my_lora, llama_2_7b_2, ties_model],\n    weights=[1, 1, 1]," in spec


def test_output_options_and_notes():
    spec = translate("""
merge_method: slerp
base_model: a
models: [{model: a}, {model: b, parameters: {weight: 2}}]
parameters: {t: 0.5, density: 0.5}
tokenizer_source: base
chat_template: "{{ messages }}\\n"
dtype: bfloat16
out_dtype: float16
""", "c.yml")
    assert spec.splitlines()[-1] == 'output slerp(a, b, t=0.5), tokenizer=a, chat_template="{{ messages }}\\n", dtype="fp16"'
    assert "# mergekit computes this merge in bfloat16 (`dtype`); mergelang always computes in float32." in spec
    assert "# note: ignored `parameters.density` (line 5): `slerp` does not use `density`" in spec
    assert "# note: ignored `models[1].parameters.weight` (line 4): `slerp` does not use `weight`" in spec


def test_linear_includes_a_base_model_missing_from_models_as_mergekit_does():
    spec = translate("merge_method: linear\nbase_model: c\nmodels: [{model: a}, {model: b}]\n"
                     "parameters: {weight: 1.0}\n", "c.yml")
    assert "output linear([a, b, c], weights=[1.0, 1.0, 1.0])" in spec


def test_cli_prints_writes_and_refuses_to_overwrite(tmp_path):
    runner = CliRunner()
    config = EXAMPLES / "linear.yml"
    printed = runner.invoke(main, ["import", str(config)])
    assert printed.exit_code == 0 and printed.output == translate(config.read_text(), "linear.yml")
    out = tmp_path / "spec.ml"
    assert runner.invoke(main, ["import", str(config), "-o", str(out)]).exit_code == 0
    assert out.read_text() == printed.output
    out.write_text("mine\n")
    refused = runner.invoke(main, ["import", str(config), "-o", str(out)])
    assert refused.exit_code == 1 and "already exists" in refused.output and out.read_text() == "mine\n"
    assert runner.invoke(main, ["import", str(config), "-o", str(out), "--force"]).exit_code == 0
    assert out.read_text() == printed.output


# ---- (c) errors ------------------------------------------------------------------------------------


def import_error(tmp_path: Path, text: str) -> str:
    path = tmp_path / "bad.yml"
    path.write_text(text)
    result = CliRunner().invoke(main, ["import", str(path)])
    assert result.exit_code == 1, result.output
    return result.output.replace(str(path), "bad.yml")


def test_unknown_merge_method(tmp_path):
    out = import_error(tmp_path, "models:\n  - model: a\nmerge_method: tiess\nbase_model: a\n")
    assert "error[E002]: `merge_method`: mergelang has no method 'tiess'" in out
    assert "--> bad.yml:3:15" in out and "did you mean `ties`?" in out
    assert "3 | merge_method: tiess\n  |               ^^^^^" in out


@pytest.mark.parametrize("key,text,where,why", [
    ("tokenizer", "merge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]\ntokenizer:\n  source: union\n",
     "bad.yml:3:1", "has no mergelang equivalent"),
    ("modules", "merge_method: linear\nmodules:\n  text: {models: [{model: a}]}\n", "bad.yml:2:1", "per-module"),
    ("residual_weight", "merge_method: passthrough\nslices:\n  - sources: [{model: a, layer_range: [0, 2]}]\n"
                        "    residual_weight: 0.5\n", "bad.yml:4:5", "no residual weight"),
])
def test_untranslatable_keys_are_named_at_their_position(tmp_path, key, text, where, why):
    out = import_error(tmp_path, text)
    assert out.startswith("error[E032]: `") and key in out.splitlines()[0] and why in out
    assert f"--> {where}" in out


def test_tokenizer_source_union(tmp_path):
    out = import_error(tmp_path, "merge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]\n"
                                 "tokenizer_source: union\n")
    assert "error[E032]: `tokenizer_source: union` cannot be translated" in out and "--> bad.yml:3:19" in out


def test_malformed_yaml_points_at_line_and_column(tmp_path):
    out = import_error(tmp_path, "merge_method: linear\nmodels:\n  - model: a\n   parameters: {weight: 1}\n")
    assert out.startswith("error[E001]: malformed YAML") and "--> bad.yml:4:" in out


def test_missing_required_weight_names_the_model(tmp_path):
    out = import_error(tmp_path, "merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 1}\n"
                                 "  - model: b\n")
    assert "`weight` is required for each model of `linear`; `models[1]` has none" in out
    assert "--> bad.yml:5:12" in out


def test_slerp_needs_exactly_one_other_model(tmp_path):
    out = import_error(tmp_path, "merge_method: slerp\nbase_model: a\nmodels: [{model: b}, {model: c}]\n"
                                 "parameters: {t: 0.5}\n")
    assert "`slerp` merges one model besides the base; `models` gives 2" in out


def test_multi_document_with_two_outputs(tmp_path):
    out = import_error(tmp_path, "name: x\nmerge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]\n"
                                 "---\nname: y\nmerge_method: linear\nmodels: [{model: b, parameters: {weight: 1}}]\n")
    assert "a spec has one output, but nothing uses the merges 'x', 'y'" in out


def test_filter_star_matches_every_tensor_and_globs_are_refused(tmp_path):
    spec = translate("merge_method: slerp\nbase_model: a\nmodels: [{model: a}, {model: b}]\n"
                     "parameters:\n  t:\n    - {filter: mlp, value: 0.1}\n    - {filter: '*', value: 0.2}\n"
                     "    - {value: 0.3}\n", "c.yml")
    assert 'output slerp(a, b, t=match tensor { "mlp" => 0.1, _ => 0.2 })' in spec
    out = import_error(tmp_path, "merge_method: slerp\nbase_model: a\nmodels: [{model: a}, {model: b}]\n"
                                 "parameters:\n  t:\n    - {filter: 'layers.*.mlp', value: 0.1}\n    - {value: 0.3}\n")
    assert "mergekit matches 'layers.*.mlp' as a plain substring" in out and "--> bad.yml:6:16" in out


def test_missing_config_file(tmp_path):
    result = CliRunner().invoke(main, ["import", str(tmp_path / "nope.yml")])
    assert result.exit_code == 1
    assert f"error[E007]: config file not found: {tmp_path / 'nope.yml'}" in result.output
