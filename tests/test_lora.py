"""`lora("ADAPTER", base=MODEL)`: PEFT LoRA adapters as deltas, against PEFT's own merge_and_unload."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from mergelang.api import RunOptions, run as run_api
from mergelang.cli import main
from mergelang.diagnostics import MergelangError
from mergelang.graph import Node
from mergelang.lower import lower
from mergelang.parse import parse
from oracle import assert_close_to_terms

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TARGETS = ["q_proj", "v_proj", "down_proj", "embed_tokens"]


def invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def llama_config(hidden: int = 32):
    return transformers.LlamaConfig(hidden_size=hidden, intermediate_size=48, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
                                    max_position_embeddings=64, tie_word_embeddings=False)


def make_base(folder: Path, seed: int = 0, hidden: int = 32) -> None:
    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(llama_config(hidden)).to(torch.float32).save_pretrained(folder)


def make_adapter(base: Path, folder: Path, seed: int = 1, **options) -> None:
    """A PEFT adapter with random (non-zero) A and B, saved as PEFT saves it."""
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = peft.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": TARGETS, "init_lora_weights": False,
                                **options})
    peft.get_peft_model(model, config).save_pretrained(folder)


def peft_merged(base: Path, adapter: Path):
    model = transformers.LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    return peft.PeftModel.from_pretrained(model, adapter).merge_and_unload()


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lora")
    make_base(root / "base")
    make_adapter(root / "base", root / "adapter")
    return root


def run(root: Path, spec: str, out: str, *extra: str) -> dict[str, torch.Tensor]:
    path = root / f"{out}.ml"
    path.write_text(spec)
    result = invoke("run", path, "-o", root / out, "-q", "--force", *extra)
    assert result.exit_code == 0, result.output
    return load_file(root / out / "model.safetensors")


SPEC = 'base = model("base")\nad = lora("{adapter}", base=base)\noutput base + ad\n'


@pytest.fixture(scope="module")
def merged(root) -> dict[str, torch.Tensor]:
    """`base + ad` for the default adapter, written with the default chunk size and 2 threads."""
    return run(root, SPEC.format(adapter="adapter"), "merged", "-j", "2")


def assert_matches_peft(ours: dict, theirs: dict, base: dict) -> None:
    """Both add (B @ A) * scale to the base in float32; the matrix product's summation order may
    differ (mergelang multiplies in blocks of rows, and BLAS kernels differ between machines)."""
    assert all(ours[name].dtype == value.dtype == torch.float32 for name, value in theirs.items())
    assert_close_to_terms(ours, dict(theirs), lora_terms(base, theirs))


def lora_terms(base: dict, merged: dict, weight: float = 1.0) -> dict:
    """A bound on the terms of base + weight * delta: |base| + weight * the tensor's largest |delta|.
    A delta's own products can cancel, so its rounding is bounded by them, not by its value; the
    tensor's largest delta stands in for them (2 ulp of it: a merge that scaled, transposed or
    dropped a delta would be off by about a delta)."""
    return {n: base[n].abs() + weight * (merged[n] - base[n]).abs().max() for n in merged}


def peft_state(root: Path, adapter: str) -> dict:
    return dict(peft_merged(root / "base", root / adapter).state_dict())


def base_of(root: Path) -> dict:
    return load_file(root / "base" / "model.safetensors")


def test_merge_equals_peft_merge_and_unload(root, merged):
    ours = merged
    base = load_file(root / "base" / "model.safetensors")
    changed = {n for n in ours if not torch.equal(ours[n], base[n])}
    # every targeted module changed (so B was not zero), and nothing else did
    assert changed == {f"model.layers.{i}.{m}.weight" for i in range(2)
                       for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")} | {"model.embed_tokens.weight"}
    assert_matches_peft(ours, peft_state(root, "adapter"), base)


def test_merged_logits_equal_peft_merged_logits(root, merged):
    ids = torch.tensor([[1, 5, 9, 33, 70, 2, 95]])
    with torch.no_grad():
        ours = transformers.LlamaForCausalLM.from_pretrained(root / "merged", dtype=torch.float32)(ids).logits
        theirs = peft_merged(root / "base", root / "adapter")(ids).logits
        base = transformers.LlamaForCausalLM.from_pretrained(root / "base", dtype=torch.float32)(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert (ours - base).abs().max() > 1e-3  # the adapter does change the model


@pytest.fixture(scope="module")
def adapter_rs(root) -> Path:
    make_adapter(root / "base", root / "adapter_rs", seed=2, use_rslora=True, r=8, lora_alpha=4)
    return root / "adapter_rs"


def test_rslora(root, adapter_rs):
    ours = run(root, SPEC.format(adapter="adapter_rs"), "merged_rs")
    assert_matches_peft(ours, peft_state(root, "adapter_rs"), base_of(root))


def test_rank_and_alpha_patterns(root):
    make_adapter(root / "base", root / "adapter_pat", seed=3,
                 rank_pattern={"v_proj": 2, r"layers\.1\.mlp\.down_proj": 6},
                 alpha_pattern={"layers.1.self_attn.q_proj": 3, "embed_tokens": 16})
    weights = load_file(root / "adapter_pat" / "adapter_model.safetensors")
    assert weights["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"].shape[0] == 6
    ours = run(root, SPEC.format(adapter="adapter_pat"), "merged_pat")
    assert_matches_peft(ours, peft_state(root, "adapter_pat"), base_of(root))


@pytest.mark.parametrize("chunk, threads", [(40, 1), (7 * 32, 2), (1 << 20, 1)])
def test_bytes_do_not_depend_on_chunk_size_or_threads(root, merged, chunk, threads):
    """Chunks of one row, of 7 rows (across the row blocks of the product), or of whole tensors, with
    1 or 2 threads, give the same bytes."""
    whole = merged
    (root / "chunked.ml").write_text(SPEC.format(adapter="adapter"))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        run_api(root / "chunked.ml", root / "chunked", RunOptions(chunk=chunk, force=True))
    finally:
        torch.set_num_threads(before)
    chunked = load_file(root / "chunked" / "model.safetensors")
    assert chunked.keys() == whole.keys()
    for name in whole:
        assert torch.equal(chunked[name], whole[name]), name


def test_read_any_element_range(root):
    """`read(name, start, stop)` of any range is that slice of the delta (PEFT's merge - base)."""
    from mergelang.io import Checkpoint
    from mergelang.io.lora import LoraAdapter

    base = load_file(root / "base" / "model.safetensors")
    merged = peft_merged(root / "base", root / "adapter").state_dict()
    with Checkpoint.open(root / "base") as ckpt, LoraAdapter.open(root / "adapter", ckpt) as adapter:
        for name in ("model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight",
                     "model.layers.0.mlp.up_proj.weight"):
            whole = adapter.read(name)
            assert whole.dtype == torch.float32 and whole.numel() == base[name].numel()
            torch.testing.assert_close(whole.view(base[name].shape), merged[name] - base[name], rtol=1e-4, atol=1e-6)
            for start, stop in ((0, 1), (5, 77), (31, 33), (250, 1000), (0, 0), (whole.numel() - 3, whole.numel())):
                assert torch.equal(adapter.read(name, start, stop), whole[start:stop]), (name, start, stop)
                # check's DARE sample reads the same values as numpy
                assert adapter.read_floats(name, start, stop).tobytes() == whole[start:stop].numpy().tobytes()
        with pytest.raises(ValueError, match="out of bounds"):
            adapter.read("model.norm.weight", 0, 10_000)


def test_dare_of_lora_equals_dare_of_materialized_delta(root):
    """`dare(ad, p=0.5)` over the adapter and over a checkpoint holding PEFT's delta: the expressions
    are structurally the same (`ad` is a load either way), so they draw the same mask."""
    base = load_file(root / "base" / "model.safetensors")
    merged = peft_merged(root / "base", root / "adapter").state_dict()
    (root / "delta").mkdir(exist_ok=True)
    save_file({n: (merged[n] - base[n]).contiguous() for n in base}, str(root / "delta" / "model.safetensors"),
              metadata={"format": "pt"})
    shutil.copy(root / "base" / "config.json", root / "delta" / "config.json")
    dare = "output base + dare(ad, p=0.5)\n"
    ours = run(root, 'base = model("base")\nad = lora("adapter", base=base)\n' + dare, "dare_lora", "--seed", "5")
    ref = run(root, 'base = model("base")\nad = model("delta")\n' + dare, "dare_delta", "--seed", "5")
    name = "model.layers.0.self_attn.q_proj.weight"
    kept = ours[name] != base[name]
    assert 0.4 < kept.float().mean() < 0.6  # about half the entries dropped
    for n in base:
        assert torch.equal(ours[n] == base[n], ref[n] == base[n]), n  # the same entries kept
    # kept entries are base + 2 * delta, with deltas that differ by the product's summation order
    terms = lora_terms(base, merged, weight=2)
    assert_close_to_terms(ours, ref, terms)
    assert_close_to_terms({name: ours[name][kept]}, {name: base[name][kept] + 2 * (merged[name] - base[name])[kept]},
                          {name: terms[name][kept]})


def test_fan_in_fan_out_gpt2(tmp_path):
    """GPT-2's Conv1D weights are stored (in, out): PEFT's delta is (B @ A) transposed."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "base")
    model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base", dtype=torch.float32)
    lora_config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True,
                                  init_lora_weights=False)
    peft.get_peft_model(model, lora_config).save_pretrained(tmp_path / "adapter")
    ours = run(tmp_path, SPEC.format(adapter="adapter"), "merged")
    model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base", dtype=torch.float32)
    merged = peft.PeftModel.from_pretrained(model, tmp_path / "adapter").merge_and_unload().state_dict()
    assert ours["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)
    base = load_file(tmp_path / "base" / "model.safetensors")
    assert_matches_peft(ours, {name: merged[name] for name in ours}, base)
    assert not torch.equal(ours["transformer.h.0.attn.c_attn.weight"], base["transformer.h.0.attn.c_attn.weight"])


# ---- errors, all reported by `mergelang check` from headers -------------------------------------------


def broken(root: Path, tmp_path: Path, config: dict | None = None, edit=None) -> Path:
    """A copy of the adapter with its config updated and its tensors edited by `edit(dict)`."""
    folder = tmp_path / "bad"
    shutil.copytree(root / "adapter", folder)
    if config is not None:
        data = json.loads((folder / "adapter_config.json").read_text())
        data.update(config)
        (folder / "adapter_config.json").write_text(json.dumps(data))
    if edit is not None:
        tensors = load_file(folder / "adapter_model.safetensors")
        edit(tensors)
        save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    return folder


def check_fails(root: Path, tmp_path: Path, adapter: Path, *expected: str) -> str:
    spec = tmp_path / "spec.ml"
    spec.write_text(f'base = model("{root / "base"}")\nad = lora("{adapter}", base=base)\noutput base + ad\n')
    result = invoke("check", spec)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert f"{spec}:2:6" in result.output  # at the lora(...) call
    for text in expected:
        assert text in result.output, result.output
    return result.output


A0 = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B0 = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def test_check_accepts_good_adapter(root, tmp_path):
    spec = tmp_path / "spec.ml"
    spec.write_text(f'base = model("{root / "base"}")\nad = lora("{root / "adapter"}", base=base)\noutput base + ad\n')
    result = invoke("check", spec)
    assert result.exit_code == 0, result.output
    assert "ok: 21 output tensors" in result.output and "ad (21 tensors)" in result.output
    result = invoke("explain", spec)
    assert f"  ad = lora({str(root / 'adapter')!r}, base=base)" in result.output
    assert "add %0 %1" in result.output


def test_missing_base_is_one_error(root, tmp_path):
    spec = tmp_path / "spec.ml"
    spec.write_text(f'base = model("{tmp_path / "nobase"}")\nad = lora("{root / "adapter"}", base=base)\n'
                    'output base + ad\n')
    result = invoke("check", spec)
    assert result.exit_code == 1
    assert "model `base`: checkpoint folder not found" in result.output
    assert "lora `ad`" not in result.output and "1 error;" in result.output


def test_error_missing_folder(root, tmp_path):
    check_fails(root, tmp_path, tmp_path / "nowhere", "error[E007]", "adapter folder not found", "nowhere")


def test_error_missing_config(root, tmp_path):
    folder = broken(root, tmp_path)
    (folder / "adapter_config.json").unlink()
    check_fails(root, tmp_path, folder, "no adapter_config.json", str(folder))


def test_error_bin_weights(root, tmp_path):
    folder = broken(root, tmp_path)
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    check_fails(root, tmp_path, folder, "no adapter_model.safetensors", "adapter_model.bin",
                "convert it to safetensors")


def test_error_module_missing_from_base(root, tmp_path):
    def rename(t):
        for part in ("A", "B"):
            t[f"base_model.model.model.layers.7.self_attn.q_proj.lora_{part}.weight"] = \
                t.pop(f"base_model.model.model.layers.0.self_attn.q_proj.lora_{part}.weight")

    folder = broken(root, tmp_path, edit=rename)
    check_fails(root, tmp_path, folder, "adapter_model.safetensors",
                "'base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight'",
                "has no tensor 'model.layers.7.self_attn.q_proj.weight'")


def test_error_adapter_for_another_model_size(root, tmp_path):
    make_base(tmp_path / "wide", hidden=64)
    make_adapter(tmp_path / "wide", tmp_path / "wide_adapter", target_modules=["q_proj"])
    check_fails(root, tmp_path, tmp_path / "wide_adapter", "adapter_model.safetensors", "make a delta of shape",
                "has shape [", "lora_A.weight'")


def test_error_lora_a_without_b(root, tmp_path):
    folder = broken(root, tmp_path, edit=lambda t: t.pop(B0))
    check_fails(root, tmp_path, folder, f"tensor '{A0}'", "lora_A without lora_B", B0)


def test_error_rank_mismatch(root, tmp_path):
    folder = broken(root, tmp_path, config={"r": 8})
    check_fails(root, tmp_path, folder, "expected rank 8 (r in adapter_config.json)", "must have 8 rows",
                "adapter_model.safetensors: tensor 'base_model.model.")


@pytest.mark.parametrize("config, message", [
    ({"r": 0}, "r must be a positive integer, got 0"),
    ({"r": "4"}, "r must be a positive integer, got '4'"),
    ({"lora_alpha": None}, "lora_alpha must be a finite number, got None"),
    ({"rank_pattern": {"v_proj": -2}}, "rank_pattern['v_proj'] must be a positive integer, got -2"),
    ({"use_dora": True}, "use_dora is set"),
    ({"peft_type": "IA3"}, "found peft_type 'IA3'"),
])
def test_error_bad_config(root, tmp_path, config, message):
    folder = broken(root, tmp_path, config=config)
    check_fails(root, tmp_path, folder, message, "adapter_config.json")


def test_error_modules_to_save(root, tmp_path):
    def add_head(t):
        t["base_model.model.lm_head.weight"] = torch.zeros(96, 32)

    folder = broken(root, tmp_path, config={"modules_to_save": ["lm_head"]}, edit=add_head)
    check_fails(root, tmp_path, folder, "'base_model.model.lm_head.weight'", "modules_to_save")


def test_error_base_is_not_a_model(root, tmp_path):
    spec = tmp_path / "spec.ml"
    spec.write_text(f'base = model("{root / "base"}")\nft = base * 2\nad = lora("x", base=ft)\noutput base + ad\n')
    result = invoke("check", spec)
    assert result.exit_code == 1
    assert "`base` of `lora` must be a model, found a tensor" in result.output
    assert f"{spec}:3:21" in result.output


def test_error_base_missing(root, tmp_path):
    spec = tmp_path / "spec.ml"
    spec.write_text('output lora("x")\n')
    result = invoke("check", spec)
    assert result.exit_code == 1
    assert "`lora` needs `base=`" in result.output and f"{spec}:1:8" in result.output


def test_unbound_lora_and_model_override(root, merged, adapter_rs):
    """`base + lora(...)` written inline is the same merge; `--model ad=PATH` rebinds the adapter."""
    bound = merged
    inline = run(root, 'base = model("base")\noutput base + lora("adapter", base=base)\n', "inline")
    assert all(torch.equal(inline[n], bound[n]) for n in bound)
    rebound = run(root, SPEC.format(adapter="adapter"), "rebound", "--model", f"ad={root / 'adapter_rs'}")
    assert_matches_peft(rebound, peft_state(root, "adapter_rs"), base_of(root))


def test_output_the_delta_alone(root):
    """`output lora(...)` writes the delta, with the base's tensor list and config."""
    ours = run(root, 'base = model("base")\noutput lora("adapter", base=base)\n', "delta_only")
    base = load_file(root / "base" / "model.safetensors")
    merged = peft_merged(root / "base", root / "adapter").state_dict()
    assert ours.keys() == base.keys()
    name = "model.layers.1.mlp.down_proj.weight"
    torch.testing.assert_close(ours[name], merged[name] - base[name], rtol=1e-4, atol=1e-6)
    assert torch.equal(ours["model.layers.1.mlp.up_proj.weight"], torch.zeros(48, 32))  # not targeted
    assert json.loads((root / "delta_only" / "config.json").read_text())["hidden_size"] == 32


def test_error_base_is_a_lora(root, tmp_path):
    spec = tmp_path / "spec.ml"
    spec.write_text(f'base = model("{root / "base"}")\nad = lora("{root / "adapter"}", base=base)\n'
                    'ad2 = lora("x", base=ad)\noutput base + ad2\n')
    result = invoke("check", spec)
    assert result.exit_code == 1
    assert "`base` of `lora` must be a model, found a LoRA delta" in result.output
    assert f"{spec}:3:22" in result.output


def test_error_trained_bias(root, tmp_path):
    def add_bias(t):
        t["base_model.model.model.layers.0.self_attn.q_proj.bias"] = torch.zeros(32)

    folder = broken(root, tmp_path, config={"bias": "all"}, edit=add_bias)
    check_fails(root, tmp_path, folder, "'base_model.model.model.layers.0.self_attn.q_proj.bias'", "trained biases")


# ---- lowering ------------------------------------------------------------------------------------------


def lowered(text: str):
    return lower(parse(text, name="spec.ml", folder=Path("/specs")))


def test_lowering_registers_the_adapter_as_an_input():
    low = lowered('base = model("b")\nad = lora("a", base=base)\nx = lora("a", base=model("c"))\n'
                  'output base + ad + x\n')
    assert low.output == Node("add", [Node("add", [Node("load", (), {"model": "base"}),
                                                   Node("load", (), {"model": "ad"})]),
                                      Node("load", (), {"model": "x"})])
    assert [(m.key, m.kind, m.base_key, m.folder) for m in low.inputs.values()] == [
        ("base", "model", None, Path("/specs/b")), ("ad", "lora", "base", Path("/specs/a")),
        ("c", "model", None, Path("/specs/c")), ("x", "lora", "c", Path("/specs/a"))]
    # the output's config and tensor list come from the base of a LoRA used alone
    assert lowered('base = model("b")\noutput lora("a", base=base)\n').reference_model().key == "base"


@pytest.mark.parametrize("text, code, message, where", [
    ("output lora()", "E003", "`lora` takes the adapter folder as a string and `base=`; found 0 arguments", (1, 8)),
    ('b = model("b")\noutput lora(5, base=b)', "E005", "found a number", (2, 8)),
    ('b = model("b")\noutput lora("a", b, base=b)', "E003", "found 3 arguments", (2, 8)),
    ('b = model("b")\noutput lora("a", bass=b)', "E004", "`lora` has no parameter `bass`", (2, 18)),
    ('b = model("b")\noutput lora("a", base=0.5)', "E005", "`base` of `lora` must be a model, found a number",
     (2, 23)),
    ('b = model("b")\noutput b + lora("a", base="b")', "E005", "must be a model, found a string", (2, 27)),
])
def test_lowering_errors(text, code, message, where):
    with pytest.raises(MergelangError) as info:
        lowered(text + "\n")
    (d,) = info.value.diagnostics
    assert (d.code, (d.span.line, d.span.col)) == (code, where)
    assert message in d.message
