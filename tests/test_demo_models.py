"""The tiny demo checkpoints match what transformers builds and loads, and are reproducible."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from mergelang.demo import DEMO_SPEC, TINY_LLAMA, llama_tensor_shapes, make_demo, make_tiny_llama

transformers = pytest.importorskip("transformers")


def transformers_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))
    buffers = {name for name, _ in model.named_buffers()}
    shapes, seen = {}, set()
    for name, tensor in model.state_dict().items():
        # A tied weight appears under both names; a checkpoint stores it once, under the first.
        if name in buffers or tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        shapes[name] = tuple(tensor.shape)
    return shapes


def read_folder(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def weights_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for file in sorted(folder.glob("*.safetensors")):
        h.update(file.name.encode())
        h.update(file.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"tie_word_embeddings": True},
        {"num_key_value_heads": 4, "num_hidden_layers": 3},
        {"head_dim": 16},
        {"attention_bias": True, "mlp_bias": True},
    ],
    ids=["tiny", "tied", "mha-3-layers", "wide-heads", "biases"],
)
def test_shapes_match_transformers(overrides):
    config = {**TINY_LLAMA, **overrides}
    expected = transformers_shapes(config)
    ours = llama_tensor_shapes(config)
    assert list(ours.items()) == list(expected.items())


def test_tiny_llama_tensor_list():
    shapes = llama_tensor_shapes(TINY_LLAMA)
    assert len(shapes) == 1 + 2 * 9 + 2
    assert list(shapes)[:2] == ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"]
    assert shapes["model.layers.1.self_attn.v_proj.weight"] == (16, 32)
    assert shapes["model.layers.1.mlp.down_proj.weight"] == (32, 64)
    assert shapes["lm_head.weight"] == (128, 32)


def test_loads_in_transformers(tmp_path):
    folder = make_tiny_llama(tmp_path / "m", seed=3)
    written = read_folder(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    state = {k: v for k, v in model.state_dict().items() if k in written}
    assert set(state) == set(written) == set(llama_tensor_shapes(TINY_LLAMA))
    for name, tensor in written.items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(state[name].to(tensor.dtype), tensor), name

    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, 4, 128)
    assert torch.isfinite(logits).all()


def test_loads_sharded_in_transformers(tmp_path):
    folder = make_tiny_llama(tmp_path / "m", seed=3, shard_size=8_000)
    written = read_folder(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    state = model.state_dict()
    for name, tensor in written.items():
        assert torch.equal(state[name].to(tensor.dtype), tensor), name


def test_config_files(tmp_path):
    folder = make_tiny_llama(tmp_path / "m", seed=0, dtype=torch.float16)
    config = json.loads((folder / "config.json").read_text())
    assert config["torch_dtype"] == "float16"
    assert config["dtype"] == "float16"
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert {k: config[k] for k in ("hidden_size", "num_hidden_layers", "vocab_size")} == {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "vocab_size": 128,
    }
    generation = json.loads((folder / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (1, 2)
    assert all(t.dtype == torch.float16 for t in read_folder(folder).values())
    with safe_open(folder / "model.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert TINY_LLAMA["torch_dtype"] == "bfloat16"


def test_base_weight_statistics(tmp_path):
    weights = read_folder(make_tiny_llama(tmp_path / "m", seed=0, dtype=torch.float32))
    matrices = torch.cat([w.flatten() for n, w in weights.items() if w.ndim == 2])
    norms = torch.cat([w.flatten() for n, w in weights.items() if w.ndim == 1])
    assert abs(matrices.mean().item()) < 0.001
    assert matrices.std().item() == pytest.approx(0.02, rel=0.05)
    assert norms.mean().item() == pytest.approx(1.0, abs=0.01)
    assert norms.std().item() == pytest.approx(0.02, rel=0.3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("delta_std", [0.005, 0.03])
def test_finetune_delta(tmp_path, dtype, delta_std):
    base = make_tiny_llama(tmp_path / "base", seed=0, dtype=dtype)
    ft = make_tiny_llama(tmp_path / "ft", seed=1, base=base, delta_std=delta_std, dtype=dtype)
    assert json.loads((ft / "config.json").read_text()) == json.loads((base / "config.json").read_text())
    b, f = read_folder(base), read_folder(ft)
    assert set(b) == set(f)
    delta = torch.cat([(f[n].float() - b[n].float()).flatten() for n in b if b[n].ndim == 2])
    assert abs(delta.mean().item()) < delta_std / 10
    # bf16 rounds each fine-tuned weight to 8 significant bits, which adds a little spread.
    assert delta.std().item() == pytest.approx(delta_std, rel=0.05 if dtype == torch.float32 else 0.15)


def test_finetune_of_sharded_base(tmp_path):
    base = make_tiny_llama(tmp_path / "base", seed=0, shard_size=8_000)
    ft_a = make_tiny_llama(tmp_path / "a", seed=1, base=base)
    whole = make_tiny_llama(tmp_path / "whole", seed=0)
    ft_b = make_tiny_llama(tmp_path / "b", seed=1, base=whole)
    assert weights_digest(ft_a) == weights_digest(ft_b)


def test_deterministic(tmp_path):
    a = make_tiny_llama(tmp_path / "a", seed=5)
    b = make_tiny_llama(tmp_path / "b", seed=5)
    c = make_tiny_llama(tmp_path / "c", seed=6)
    assert weights_digest(a) == weights_digest(b)
    assert weights_digest(a) != weights_digest(c)
    assert (a / "config.json").read_bytes() == (c / "config.json").read_bytes()

    fa = make_tiny_llama(tmp_path / "fa", seed=7, base=a)
    fb = make_tiny_llama(tmp_path / "fb", seed=7, base=b)
    fc = make_tiny_llama(tmp_path / "fc", seed=8, base=a)
    assert weights_digest(fa) == weights_digest(fb)
    assert weights_digest(fa) != weights_digest(fc)


def test_sharded_index_covers_every_tensor(tmp_path):
    folder = make_tiny_llama(tmp_path / "m", seed=0, shard_size=8_000)
    assert not (folder / "model.safetensors").exists()
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    files = sorted(folder.glob("model-*.safetensors"))
    n = len(files)
    assert n > 1
    assert [f.name for f in files] == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]

    shapes = llama_tensor_shapes(TINY_LLAMA)
    assert set(index["weight_map"]) == set(shapes)
    total = 0
    for file in files:
        with safe_open(file, framework="pt") as f:
            names = set(f.keys())
            assert f.metadata() == {"format": "pt"}
            for name in names:
                total += f.get_tensor(name).numel() * 2
        assert names == {k for k, v in index["weight_map"].items() if v == file.name}
    assert index["metadata"]["total_size"] == total

    sharded = read_folder(folder)
    whole = read_folder(make_tiny_llama(tmp_path / "whole", seed=0))
    assert sharded.keys() == whole.keys()
    assert all(torch.equal(sharded[k], whole[k]) for k in whole)


def test_shard_size_larger_than_model_writes_one_file(tmp_path):
    folder = make_tiny_llama(tmp_path / "m", seed=0, shard_size=10**9)
    assert [p.name for p in folder.glob("*.safetensors")] == ["model.safetensors"]
    assert not (folder / "model.safetensors.index.json").exists()


def test_rewriting_a_folder_removes_stale_shards(tmp_path):
    folder = make_tiny_llama(tmp_path / "m", seed=0, shard_size=8_000)
    make_tiny_llama(folder, seed=0)
    assert [p.name for p in folder.glob("*.safetensors")] == ["model.safetensors"]
    assert not (folder / "model.safetensors.index.json").exists()


def test_make_demo_is_idempotent(tmp_path):
    spec = make_demo(tmp_path / "demo")
    assert spec == tmp_path / "demo" / "spec.ml"
    assert spec.read_text() == DEMO_SPEC
    digests = {name: weights_digest(tmp_path / "demo" / name) for name in ("base", "ft0", "ft1")}
    assert len(set(digests.values())) == 3

    make_demo(tmp_path / "demo")
    assert {name: weights_digest(tmp_path / "demo" / name) for name in digests} == digests
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == ["base", "ft0", "ft1", "spec.ml"]

    base = read_folder(tmp_path / "demo" / "base")
    for ft in ("ft0", "ft1"):
        tuned = read_folder(tmp_path / "demo" / ft)
        delta = (tuned["model.embed_tokens.weight"].float() - base["model.embed_tokens.weight"].float()).std()
        assert 0.003 < delta.item() < 0.008
