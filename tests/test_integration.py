"""The features together: `.bin` inputs, hub-cache ids, `lora(...)`, layer stacking, output options,
the model card and `verify`, `stats` and `import`, in one spec at a time.

Every output is compared with tensors assembled here by hand from the inputs (read with safetensors,
torch.load and PEFT's own merge), or with transformers' logits of a model built from them.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from conftest import digests
from mergelang.cli import main
from mergelang.demo import TINY_LLAMA, make_tiny_llama
from oracle import assert_close_to_terms, load_folder
from test_hub_cache import add_snapshot
from test_io_bin import to_bin
from test_lora import lora_terms, make_adapter, peft_merged

transformers = pytest.importorskip("transformers")

LAYERS = 4
CONFIG = {**TINY_LLAMA, "num_hidden_layers": LAYERS}
HUB_COMMIT = hashlib.sha1(b"ft1").hexdigest()


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def run(world: Path, spec: str, out: str, *extra) -> Path:
    (world / f"{out}.ml").write_text(spec)
    result = invoke("run", world / f"{out}.ml", "-o", world / out, "-q", "--force", *extra)
    assert result.exit_code == 0, result.output
    return world / out


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """base/ (safetensors), ft0bin/ (.bin), org/ft1 in a hub cache, adapter/ (PEFT LoRA over base),
    big/ (136 rows of vocabulary instead of 128): float32 tiny Llamas of 4 layers."""
    root = tmp_path_factory.mktemp("world")
    f32 = torch.float32
    make_tiny_llama(root / "base", seed=0, config=CONFIG, dtype=f32)
    make_tiny_llama(root / "ft0", seed=1, base=root / "base", delta_std=0.01, dtype=f32)
    to_bin(root / "ft0", root / "ft0bin")
    make_tiny_llama(root / "ft1src", seed=2, base=root / "base", delta_std=0.01, dtype=f32)
    add_snapshot(root / "hf", "org/ft1", HUB_COMMIT, root / "ft1src", refs=("main",))
    make_adapter(root / "base", root / "adapter")
    make_tiny_llama(root / "big", seed=3, config={**CONFIG, "vocab_size": 136}, dtype=f32)
    return root


@pytest.fixture(scope="module", autouse=True)
def hub_cache(world):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_CACHE", str(world / "hf"))
        yield world / "hf"


@pytest.fixture(scope="module")
def tensors(world) -> dict:
    """Every input's tensors, read independently of mergelang; "lora" is PEFT's merge of base + adapter."""
    merged = {k: v.detach().clone() for k, v in peft_merged(world / "base", world / "adapter").state_dict().items()}
    return {"base": load_file(world / "base" / "model.safetensors"),
            "bin": torch.load(world / "ft0bin" / "pytorch_model.bin", weights_only=True),
            "hub": load_file(world / "ft1src" / "model.safetensors"),
            "lora": merged,
            "big": load_file(world / "big" / "model.safetensors")}


def layer(name: str, k: int) -> str:
    return f"model.layers.{k}.{name}"


LAYER_TENSORS = ["input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_proj.weight",
                 "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
                 "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"]


def stacked(parts: list[tuple[dict, int, int]]) -> dict[str, torch.Tensor]:
    """A stack assembled by hand: embeddings from the first part's model, final norm and head from
    the last's, output layer K from the layer of the part that holds it."""
    out = {"model.embed_tokens.weight": parts[0][0]["model.embed_tokens.weight"],
           "model.norm.weight": parts[-1][0]["model.norm.weight"],
           "lm_head.weight": parts[-1][0]["lm_head.weight"]}
    k = 0
    for source, start, end in parts:
        for i in range(start, end):
            out.update({layer(n, k): source[layer(n, i)] for n in LAYER_TENSORS})
            k += 1
    return out


def assert_equal_tensors(ours: dict, expected: dict, lora_terms: dict | None = None) -> None:
    """Equal bits, except tensors with a LoRA delta (the keys of `lora_terms`, test_lora.lora_terms):
    within 2 ulp of their terms of PEFT's, which may sum the product in another order."""
    lora_terms = lora_terms or {}
    assert sorted(ours) == sorted(expected)
    exact = {n: ours[n] for n in ours if n not in lora_terms}
    assert all(torch.equal(exact[n], expected[n]) for n in exact), \
        [n for n in exact if not torch.equal(exact[n], expected[n])]
    assert_close_to_terms({n: ours[n] for n in lora_terms}, {n: expected[n] for n in lora_terms}, lora_terms)


def lora_changed(parts, tensors) -> dict[str, torch.Tensor]:
    """The hand-made stack's tensors that carry a LoRA delta (they differ from the base's), each with
    a bound on its terms."""
    base = stacked([(tensors["base"], s, e) if src is tensors["lora"] else (src, s, e) for src, s, e in parts])
    out = stacked(parts)
    return lora_terms(base, {n: out[n] for n in out if not torch.equal(out[n], base[n])})


# ---- stacked outputs from a .bin model, a hub id and base + lora --------------------------------

STACK_SPEC = """\
base = model("base")
binm = model("ft0bin")
hub = model("org/ft1")
ad = lora("adapter", base=base)
output stack(layer_range(base + ad, 0, 2), layer_range(binm, 1, 3), layer_range(hub, 2, 4))
"""


@pytest.fixture(scope="module")
def stack_out(world) -> Path:
    return run(world, STACK_SPEC, "stacked")


def test_stack_of_lora_bin_and_hub_parts(world, tensors, stack_out):
    parts = [(tensors["lora"], 0, 2), (tensors["bin"], 1, 3), (tensors["hub"], 2, 4)]
    expected = stacked(parts)
    changed = lora_changed(parts, tensors)
    # the adapter targets q_proj, v_proj, down_proj and the embeddings: all in the first part
    assert changed.keys() == {"model.embed_tokens.weight"} | {layer(n, k) for k in (0, 1) for n in
                                                       ("self_attn.q_proj.weight", "self_attn.v_proj.weight",
                                                        "mlp.down_proj.weight")}
    assert_equal_tensors(load_folder(stack_out), expected, changed)
    config = json.loads((stack_out / "config.json").read_text())
    assert config["num_hidden_layers"] == 6 and config["vocab_size"] == 128


def test_lora_part_last_and_inside_a_range(world, tensors):
    """`layer_range` over a LoRA delta (a delta is a value like any other) and the LoRA part last, so
    that the head and final norm come from base + ad."""
    spec = ('base = model("base")\nbinm = model("ft0bin")\nad = lora("adapter", base=base)\n'
            "output stack(layer_range(binm, 0, 3), layer_range(base, 1, 4) + layer_range(ad, 1, 4))\n")
    out = load_folder(run(world, spec, "lora_last"))
    parts = [(tensors["bin"], 0, 3), (tensors["lora"], 1, 4)]
    assert_equal_tensors(out, stacked(parts), lora_changed(parts, tensors))


# ---- tokenizer= and config= with a stacked output -------------------------------------------------

OPTIONS_SPEC = """\
base = model("base")
binm = model("ft0bin")
hub = model("org/ft1")
big = model("big")
ad = lora("adapter", base=base)
output stack(layer_range(binm, 0, 3), layer_range(base + ad, 1, 4)), tokenizer=big, config=hub
"""


def test_stack_with_tokenizer_and_config_loads_in_transformers(world, tensors):
    out = run(world, OPTIONS_SPEC, "options")
    parts = [(tensors["bin"], 0, 3), (tensors["lora"], 1, 4)]
    expected = stacked(parts)
    # big's vocabulary: 128 rows merged as the formula says, then big's 8 rows beyond them
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        expected[name] = torch.cat([expected[name], tensors["big"][name][128:]])
    ours = load_folder(out)
    assert_equal_tensors(ours, expected, lora_changed(parts, tensors))
    config = json.loads((out / "config.json").read_text())
    hub_config = json.loads((world / "ft1src" / "config.json").read_text())
    assert config == {**hub_config, "num_hidden_layers": 6, "vocab_size": 136}
    assert config["num_hidden_layers"] == 1 + max(int(n.split(".")[2]) for n in ours if n.startswith("model.layers."))
    assert config["vocab_size"] == ours["model.embed_tokens.weight"].shape[0] == ours["lm_head.weight"].shape[0]

    ids = torch.tensor([[1, 5, 9, 33, 127, 130, 135]])  # ids beyond 127 exist only in big's vocabulary
    by_hand = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**CONFIG, "num_hidden_layers": 6,
                                                                          "vocab_size": 136}))
    by_hand.load_state_dict(expected)
    with torch.no_grad():
        got = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(ids).logits
        want = by_hand.to(torch.float32)(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ---- stats and the DARE warning ---------------------------------------------------------------------


def stats_json(ft: Path, base: Path) -> dict:
    result = invoke("stats", ft, base, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_stats_of_a_bin_model_equal_those_of_its_safetensors(world, tensors):
    from_bin = stats_json(world / "ft0bin", world / "base")
    from_st = stats_json(world / "ft0", world / "base")
    assert json.dumps(from_bin, sort_keys=True).replace("ft0bin", "ft0") == json.dumps(from_st, sort_keys=True)
    deltas = [(tensors["bin"][n] - tensors["base"][n]).abs().flatten() for n in tensors["base"]]
    assert from_bin["overall"]["max_abs"] == pytest.approx(float(torch.cat(deltas).max()), rel=0, abs=0)


def check_output(world: Path, spec: str, name: str):
    (world / f"{name}.ml").write_text(spec)
    result = invoke("check", world / f"{name}.ml")
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def far(world) -> Path:
    """A fine-tune of base whose deltas are large (N(0, 0.08))."""
    make_tiny_llama(world / "far", seed=4, base=world / "base", delta_std=0.08, dtype=torch.float32)
    return world / "far"


def test_dare_warning_skips_lora_deltas_but_not_plain_large_deltas(world, tensors, far):
    # The adapter's own delta is large: as a model on disk, its dare would be warned about.
    lora_delta = torch.cat([(tensors["lora"][n] - tensors["base"][n]).abs().flatten() for n in tensors["base"]])
    nonzero = lora_delta[lora_delta > 0]
    assert float(torch.quantile(nonzero.double(), 0.99)) >= 0.03
    spec = 'base = model("base")\nad = lora("adapter", base=base)\noutput base + dare(ad, p=0.9)\n'
    assert "E030" not in check_output(world, spec, "dare_lora")  # skipped, as docs/stats.md says
    spec = 'base = model("base")\nfar = model("far")\noutput base + dare(far - base, p=0.9)\n'
    found = check_output(world, spec, "dare_far")
    assert "warning[E030]: `dare` with p = 0.9 on `far - base`" in found


@pytest.mark.parametrize("base_range, warned", [("2, 4", False), ("0, 2", True)])
def test_dare_warning_samples_the_layers_a_stack_reads(world, base_range, warned):
    """ft0's deltas are small (N(0, 0.01)); layer 2 of ft0 minus layer 0 of base is not."""
    spec = ('base = model("base")\nft0 = model("ft0bin")\n'
            "output stack(layer_range(base, 0, 2),\n"
            "             layer_range(base, 2, 4)\n"
            f"             + dare(layer_range(ft0, 2, 4) - layer_range(base, {base_range}), p=0.9))\n")
    assert ("warning[E030]" in check_output(world, spec, "dare_stacked")) == warned


def test_dare_warning_in_a_later_stack_part(world, far):
    """The output's layers 4..7 do not exist in the inputs: the sample reads layers 0..3."""
    spec = ('base = model("base")\nfar = model("far")\n'
            "output stack(layer_range(base, 0, 4), layer_range(base + dare(far - base, p=0.9), 0, 4))\n")
    assert "warning[E030]: `dare` with p = 0.9 on `far - base`" in check_output(world, spec, "dare_late")


# ---- the model card and verify ----------------------------------------------------------------------

VERIFIED = {
    "stacked": STACK_SPEC,
    "lora": 'base = model("base")\nad = lora("adapter", base=base)\noutput base + ad\n',
    "bin": 'base = model("base")\nbinm = model("ft0bin")\noutput base + dare(binm - base, p=0.5)\n',
    "hub": 'base = model("base")\nhub = model("org/ft1")\noutput slerp(base, hub, t=layers(0.2, 0.8))\n',
    "options": OPTIONS_SPEC.replace("config=hub", 'config=hub, dtype="bf16", chat_template="{{ messages }}"'),
}


def verify(folder: Path, *extra):
    return invoke("verify", folder, "-q", *extra)


@pytest.mark.parametrize("name", VERIFIED)
def test_verify_is_identical(world, name):
    out = run(world, VERIFIED[name], f"verify_{name}", "--seed", "5")
    result = verify(out)
    assert result.exit_code == 0 and result.output.endswith("identical\n"), result.output


def flip_byte(path: Path, offset: int = -100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture
def own(world, tmp_path) -> Path:
    """Copies of base, the .bin model and the adapter, to change after a merge."""
    for name in ("base", "ft0bin", "adapter"):
        shutil.copytree(world / name, tmp_path / name)
    return tmp_path


def test_verify_names_a_changed_bin_file(own):
    out = run(own, VERIFIED["bin"], "merged", "--seed", "5")
    assert verify(out).exit_code == 0
    flip_byte(own / "ft0bin" / "pytorch_model.bin")
    result = verify(out)
    assert result.exit_code == 1
    assert "model `binm`: file pytorch_model.bin changed since the merge: its sha256 was" in result.output


@pytest.mark.parametrize("change", ["weights", "config"])
def test_verify_names_a_changed_adapter(own, change):
    out = run(own, VERIFIED["lora"], "merged")
    assert verify(out).exit_code == 0
    if change == "weights":
        flip_byte(own / "adapter" / "adapter_model.safetensors")
        file = "adapter_model.safetensors"
    else:
        config = json.loads((own / "adapter" / "adapter_config.json").read_text())
        (own / "adapter" / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 16}))
        file = "adapter_config.json"
    result = verify(out)
    assert result.exit_code == 1
    assert f"model `ad`: file {file} changed since the merge" in result.output


# ---- mergelang import → run → verify ----------------------------------------------------------------

EXAMPLES = Path(__file__).parent / "data" / "mergekit_examples"


def test_imported_frankenmerge_from_hub_ids(world, tmp_path):
    """orcamini-platy-44layer.yml, translated, run on 40-layer tiny models cached under its hub ids."""
    deep = {**TINY_LLAMA, "num_hidden_layers": 40}
    make_tiny_llama(tmp_path / "orca", seed=5, config=deep)
    make_tiny_llama(tmp_path / "platy", seed=6, base=tmp_path / "orca", delta_std=0.02)
    cache = tmp_path / "hf"
    add_snapshot(cache, "psmathur/orca_mini_v3_13b", HUB_COMMIT, tmp_path / "orca", refs=("main",))
    add_snapshot(cache, "garage-bAInd/Platypus2-13B", HUB_COMMIT, tmp_path / "platy", refs=("main",))
    result = invoke("import", EXAMPLES / "orcamini-platy-44layer.yml", "-o", tmp_path / "spec.ml")
    assert result.exit_code == 0, result.output
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_CACHE", str(cache))
        result = invoke("run", tmp_path / "spec.ml", "-o", tmp_path / "out", "-q")
        assert result.exit_code == 0, result.output
        result = verify(tmp_path / "out")
        assert result.exit_code == 0 and result.output.endswith("identical\n"), result.output

    orca, platy = load_folder(tmp_path / "orca"), load_folder(tmp_path / "platy")
    expected = {"model.embed_tokens.weight": orca["model.embed_tokens.weight"],
                "model.norm.weight": platy["model.norm.weight"], "lm_head.weight": platy["lm_head.weight"]}
    for k in range(44):
        source, i = (orca, k) if k < 24 else (platy, k - 24 + 20)
        expected.update({layer(n, k): source[layer(n, i)] for n in LAYER_TENSORS})
    expected = {n: t.to(torch.float16) for n, t in expected.items()}  # the config's `dtype: float16`
    assert_equal_tensors(load_folder(tmp_path / "out"), expected)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_hidden_layers"] == 44 and config["torch_dtype"] == "float16"


# ---- reproducibility: lora + stack + dare -----------------------------------------------------------

REPRODUCIBLE_SPEC = """\
base = model("base")
binm = model("ft0bin")
hub = model("org/ft1")
ad = lora("adapter", base=base)
output stack(layer_range(base + dare(ad, p=0.5), 0, 3),
             layer_range(base + dare(binm - base, p=0.3, seed=1), 1, 4) + layer_range(hub - base, 0, 3)),
       dtype="bf16", chat_template="{{ messages }}"
"""



def test_bytes_do_not_depend_on_threads_or_chunks(world, tmp_path):
    from mergelang.api import RunOptions, run as run_api

    spec = world / "reproducible.ml"
    spec.write_text(REPRODUCIBLE_SPEC)
    outs = {}
    threads = torch.get_num_threads()
    try:
        for j in ("1", "2"):
            result = invoke("run", spec, "-o", tmp_path / f"j{j}", "--seed", "11", "-j", j, "--shard-size", "30KB",
                            "-q")
            assert result.exit_code == 0, result.output
            outs[f"-j {j}"] = digests(tmp_path / f"j{j}")
    finally:
        torch.set_num_threads(threads)
    for chunk in (100, 224, 4096):  # 100 is not a multiple of a row (32) or of LoRA's row blocks
        run_api(spec, tmp_path / f"c{chunk}", RunOptions(seed=11, shard_size=30_000, chunk=chunk, reverse=True))
        outs[f"chunk {chunk}, reversed"] = digests(tmp_path / f"c{chunk}")
    reference = outs["-j 1"]
    assert sum(n.endswith(".safetensors") for n in reference) > 3 and "README.md" in reference
    for setting, found in outs.items():
        assert found == reference, setting
    # The comparison can fail: another seed changes the masks of both dare parts.
    run_api(spec, tmp_path / "seed12", RunOptions(seed=12, shard_size=30_000))
    other = load_folder(tmp_path / "seed12")
    ours = load_folder(tmp_path / "j1")
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(other[q], ours[q])
    assert not torch.equal(other["model.layers.4.mlp.up_proj.weight"], ours["model.layers.4.mlp.up_proj.weight"])


# ---- explain and check ------------------------------------------------------------------------------

EXPLAINED = """\
inputs:
  base = model('base')  # {world}/base
  binm = model('ft0bin')  # {world}/ft0bin
  hub = model('org/ft1')  # {world}/hf/models--org--ft1/snapshots/{commit}
  ad = lora('adapter', base=base)  # {world}/adapter
graph for model.layers.4.self_attn.q_proj.weight:
  %0 = load base tensor=model.layers.2.self_attn.q_proj.weight # {spec}:1:8
  %1 = load binm tensor=model.layers.2.self_attn.q_proj.weight # {spec}:2:8
  %2 = sub %1 %0                                   # {spec}:6:38
  %3 = dare %2 p=0.3 seed=1                        # {spec}:6:33
  %4 = add %0 %3                                   # {spec}:6:26
  %5 = load hub tensor=model.layers.1.self_attn.q_proj.weight # {spec}:3:7
  %6 = load base tensor=model.layers.1.self_attn.q_proj.weight # {spec}:1:8
  %7 = sub %5 %6                                   # {spec}:6:87
  %8 = add %4 %7                                   # {spec}:6:14
  output = %8
"""


def test_explain_and_check_with_every_feature(world):
    """Output layer 4 is layer 1 of the second part: layer 2 of base and binm, layer 1 of hub - base."""
    spec = world / "reproducible.ml"
    spec.write_text(REPRODUCIBLE_SPEC)
    result = invoke("explain", spec, "--tensor", "model.layers.4.self_attn.q_proj.weight")
    assert result.exit_code == 0, result.output
    assert result.output == EXPLAINED.format(world=world, commit=HUB_COMMIT, spec=spec)
    result = invoke("explain", spec, "--tensor", "model.layers.1.self_attn.q_proj.weight")
    assert "  %1 = load ad   " in result.output and "tensor=" not in result.output  # the first part reads its own layer
    result = invoke("check", spec)
    assert result.exit_code == 0, result.output
    # 3 + 3 layers of 9 tensors, the embeddings, the final norm and the head
    assert result.output.strip().endswith("ok: 57 output tensors, 0.1 MB; inputs: base (39 tensors), "
                                          "binm (39 tensors), hub (39 tensors), ad (39 tensors)")


# ---- errors across features ---------------------------------------------------------------------


def check_fails(world: Path, spec: str, *extra) -> str:
    (world / "bad.ml").write_text(spec)
    result = invoke("check", world / "bad.ml", *extra)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    return result.output


@pytest.mark.parametrize("base", ["stack(layer_range(base, 0, 2), layer_range(binm, 2, 4))",
                                  "layer_range(base, 0, 2)", "base + binm"])
def test_lora_base_must_be_a_model(world, base):
    """docs/lora.md: `base=` must be a model (a name bound to `model(...)`)."""
    spec = f'base = model("base")\nbinm = model("ft0bin")\nad = lora("adapter", base={base})\noutput base + ad\n'
    found = check_fails(world, spec)
    assert "error[E005]: `base` of `lora` must be a model, found a tensor" in found
    assert (f"bad.ml:3:27\n  |\n3 | ad = lora(\"adapter\", base={base})\n"
            f"  |                           {'^' * len(base)}") in found


@pytest.mark.parametrize("option", ["config", "tokenizer"])
def test_output_options_refuse_an_adapter(world, option):
    """A LoRA adapter folder has no config.json or tokenizer: `config=ad` used to write no config."""
    spec = f'base = model("base")\nad = lora("adapter", base=base)\noutput base + ad, {option}=ad\n'
    found = check_fails(world, spec)
    assert f"error[E005]: `{option}=` must name a model, found the LoRA adapter `ad`" in found
    assert f"help: the adapter's config and tokenizer are its base's: write `{option}=base`" in found


def test_model_option_rebinds_a_hub_id_to_a_folder(world, tmp_path):
    """--model hub=FOLDER (or by the id as written) reads the folder; the output is the hub run's."""
    spec = VERIFIED["hub"]
    by_hub = run(world, spec, "rebind_hub")
    copy = Path(shutil.copytree(world / "ft1src", tmp_path / "ft1copy"))
    for name in ("hub", "org/ft1"):
        out = run(world, spec, "rebind_folder", "--model", f"{name}={copy}")
        assert digests(out)["model.safetensors"] == digests(by_hub)["model.safetensors"]
        record = (out / "README.md").read_text()
        assert f'"resolved": "{copy}"' in record
        result = verify(out)
        assert result.exit_code == 0 and result.output.endswith("identical\n"), result.output
    # the folder changes: verify names the rebound input
    flip_byte(copy / "model.safetensors")
    result = verify(out)
    assert result.exit_code == 1 and "model `hub`: file model.safetensors changed since the merge" in result.output
    found = check_fails(world, spec, "--model", f"hub={tmp_path / 'nowhere'}")
    assert "error[E007]: model `hub`: checkpoint folder not found" in found
    assert f"note: looked in {tmp_path / 'nowhere'}" in found
    assert "help: the path given by --model hub=... is relative to the working folder" in found


def test_stats_of_a_hub_id_equal_those_of_its_folder(world, hub_cache):
    by_id = stats_json("org/ft1", world / "base")
    by_folder = stats_json(world / "ft1src", world / "base")
    assert by_id.pop("ft") == str(hub_cache / "models--org--ft1" / "snapshots" / HUB_COMMIT)
    by_folder.pop("ft")
    assert by_id == by_folder


def test_stats_refuses_an_adapter(world):
    result = invoke("stats", world / "adapter", world / "base")
    assert result.exit_code == 1
    assert (f"error[E007]: the fine-tuned model: {world / 'adapter'} is a LoRA adapter, not a checkpoint"
            in result.output)


def test_config_from_another_model_gets_the_stack_layer_types(world, tmp_path):
    """With config=typed, the written config is typed's: its layer_types must be rebuilt for 6 layers
    (it was left at typed's 4 when only the reference's config was looked at)."""
    typed = Path(shutil.copytree(world / "base", tmp_path / "typed"))
    config = json.loads((typed / "config.json").read_text())
    config["layer_types"] = ["full_attention", "sliding_attention"] * 2
    (typed / "config.json").write_text(json.dumps(config))
    spec = (f'base = model("base")\nbinm = model("ft0bin")\ntyped = model("{typed}")\n'
            "output stack(layer_range(base, 0, 3), layer_range(binm, 1, 4)), config=typed\n")
    out = json.loads((run(world, spec, "typed_out") / "config.json").read_text())
    # base and binm have no layer_types of their own: each layer takes the written config's first entry
    assert out == {**config, "num_hidden_layers": 6, "layer_types": ["full_attention"] * 6}


def test_verify_names_a_changed_chat_template_file(own):
    """A `chat_template=` file is an input of the run: its change is reported as one, by name."""
    (own / "templates").mkdir()
    (own / "templates" / "chat.jinja").write_text("{{ messages }}")
    spec = 'base = model("base")\nbinm = model("ft0bin")\noutput base + binm, chat_template="templates/chat.jinja"\n'
    out = run(own, spec, "merged")
    assert (out / "chat_template.jinja").read_text() == "{{ messages }}"
    assert verify(out).exit_code == 0
    (own / "templates" / "chat.jinja").write_text("{{ other }}")
    result = verify(out)
    assert result.exit_code == 1
    old, new = (hashlib.sha256(t.encode()).hexdigest() for t in ("{{ messages }}", "{{ other }}"))
    assert (f"error[E034]: the spec's file templates/chat.jinja changed since the merge: its sha256 was {old}, "
            f"it is {new}") in result.output


def test_model_option_rebinds_a_folder_to_a_hub_id(world, hub_cache):
    """--model hub=org/ft1: the record keeps the id as given (not a path under the working folder)."""
    spec = 'base = model("base")\nhub = model("ft1src")\noutput slerp(base, hub, t=layers(0.2, 0.8))\n'
    by_folder = run(world, spec, "rebind_src")
    out = run(world, spec, "rebind_id", "--model", "hub=org/ft1")
    assert digests(out)["model.safetensors"] == digests(by_folder)["model.safetensors"]
    from mergelang.io.card import read_record

    record = read_record(out)
    assert record["options"]["models"] == {"hub": "org/ft1"}
    assert record["inputs"][1]["resolved"] == str(hub_cache / "models--org--ft1" / "snapshots" / HUB_COMMIT)
    result = verify(out)
    assert result.exit_code == 0 and result.output.endswith("identical\n"), result.output


def test_imported_lora_and_hub_id_run_and_verify(world, tensors, tmp_path):
    """mergekit's `model: base+adapter` syntax becomes `base + lora(...)`; org/ft1 comes from the cache."""
    (world / "lora_linear.yml").write_text(
        "models:\n  - model: base+adapter\n    parameters:\n      weight: 0.5\n"
        "  - model: org/ft1\n    parameters:\n      weight: 0.5\nmerge_method: linear\ndtype: float32\n")
    result = invoke("import", world / "lora_linear.yml", "-o", world / "lora_linear.ml", "--force")
    assert result.exit_code == 0, result.output
    assert 'base_adapter = base + lora("adapter", base=base)' in (world / "lora_linear.ml").read_text()
    result = invoke("run", world / "lora_linear.ml", "-o", tmp_path / "out", "-q")
    assert result.exit_code == 0, result.output
    result = verify(tmp_path / "out")
    assert result.exit_code == 0 and result.output.endswith("identical\n"), result.output
    ours = load_folder(tmp_path / "out")
    expected = {n: (0.5 * tensors["lora"][n] + 0.5 * tensors["hub"][n]) / 1.0 for n in tensors["base"]}
    terms = lora_terms(tensors["base"], tensors["lora"])
    assert_close_to_terms(ours, expected, {n: 0.5 * terms[n] + 0.5 * tensors["hub"][n].abs() for n in expected})


def test_tied_bin_model_stands_in_its_embeddings_for_the_head(world, tensors, tmp_path):
    """A tied `.bin` model has no lm_head.weight: with an untied model first, its input embeddings
    are read in its place (the .bin reader looked the alias up by the head's name and failed)."""
    make_tiny_llama(tmp_path / "tied", seed=7, config={**CONFIG, "tie_word_embeddings": True}, dtype=torch.float32)
    to_bin(tmp_path / "tied", world / "tiedbin")
    tied = torch.load(world / "tiedbin" / "pytorch_model.bin", weights_only=True)
    assert "lm_head.weight" not in tied
    spec = 'base = model("base")\ntied = model("tiedbin")\noutput avg(base, tied)\n'
    ours = load_folder(run(world, spec, "tied_out"))
    expected = {n: (tensors["base"][n] + tied[n]) / 2 for n in tied}
    expected["lm_head.weight"] = (tensors["base"]["lm_head.weight"] + tied["model.embed_tokens.weight"]) / 2
    assert_equal_tensors(ours, expected)


def test_lora_over_a_tied_base_changes_the_head_it_stands_in_for(world, tensors, tmp_path):
    """A tied base's head is its input embeddings, and so is its adapter's delta of the head: with an
    untied model first, `tied + ad` contributes PEFT's merged (tied) head, embedding delta included."""
    make_tiny_llama(tmp_path / "tied", seed=7, config={**CONFIG, "tie_word_embeddings": True}, dtype=torch.float32)
    make_adapter(tmp_path / "tied", tmp_path / "tied_adapter")
    merged = {k: v.detach().clone() for k, v in peft_merged(tmp_path / "tied", tmp_path / "tied_adapter")
              .state_dict().items()}
    assert torch.equal(merged["lm_head.weight"], merged["model.embed_tokens.weight"])
    spec = (f'base = model("base")\ntied = model("{tmp_path / "tied"}")\n'
            f'ad = lora("{tmp_path / "tied_adapter"}", base=tied)\noutput avg(base, tied + ad)\n')
    ours = load_folder(run(world, spec, "tied_lora"))
    expected = {n: (tensors["base"][n] + merged[n]) / 2 for n in tensors["base"]}
    tied_base = load_file(tmp_path / "tied" / "model.safetensors")
    tied_base.setdefault("lm_head.weight", tied_base["model.embed_tokens.weight"])
    terms = lora_terms(tied_base, merged)
    assert_close_to_terms(ours, expected, {n: 0.5 * tensors["base"][n].abs() + 0.5 * terms[n] for n in expected})


def test_imported_tokenizer_source_of_a_lora_base_names_its_model(world, tensors, tmp_path):
    """`tokenizer_source: base` with `base_model: base+adapter` used to give `tokenizer=base_adapter`,
    an expression, which `tokenizer=` refuses: the spec that import wrote did not check."""
    (world / "lora_ta.yml").write_text(
        "models:\n  - model: org/ft1\n    parameters:\n      weight: 0.5\n"
        "base_model: base+adapter\nmerge_method: task_arithmetic\ntokenizer_source: base\ndtype: float32\n")
    result = invoke("import", world / "lora_ta.yml", "-o", world / "lora_ta.ml", "--force")
    assert result.exit_code == 0, result.output
    text = (world / "lora_ta.ml").read_text()
    assert text.endswith("output task_arithmetic(base_adapter, [ft1], weights=[0.5]), tokenizer=base, dtype=\"fp32\"\n")
    result = invoke("run", world / "lora_ta.ml", "-o", tmp_path / "out", "-q")
    assert result.exit_code == 0, result.output
    result = verify(tmp_path / "out")
    assert result.exit_code == 0 and result.output.endswith("identical\n"), result.output
    lora, hub = tensors["lora"], tensors["hub"]
    expected = {n: lora[n] + 0.5 * (hub[n] - lora[n]) for n in tensors["base"]}
    terms = lora_terms(tensors["base"], lora)
    assert_close_to_terms(load_folder(tmp_path / "out"), expected, {n: terms[n] + hub[n].abs() for n in expected})


def test_import_refuses_a_tokenizer_source_that_is_an_intermediate_merge(tmp_path):
    (tmp_path / "multi.yml").write_text(
        "name: first\nmerge_method: linear\nmodels:\n  - model: a\n  - model: b\nparameters:\n  weight: 0.5\n"
        "---\nmerge_method: slerp\nbase_model: first\nmodels:\n  - model: c\nparameters:\n  t: 0.5\n"
        "tokenizer_source: base\n")
    result = invoke("import", tmp_path / "multi.yml")
    assert result.exit_code == 1
    assert ("error[E032]: `tokenizer_source` is the intermediate merge 'first', which is not a model on disk "
            "here; `tokenizer=` must name a model\n  --> " in result.output)
    assert "multi.yml:15:19" in result.output
