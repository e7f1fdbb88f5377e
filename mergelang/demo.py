"""Tiny Llama-shaped checkpoints for the `mergelang demo` command and the test-suite.

A base model is random (normal weights, norms near 1); a fine-tune is its base plus small normal noise,
the regime DARE is made for. Everything is seeded, so the same arguments always give the same bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

__all__ = [
    "DEMO_SPEC",
    "TINY_LLAMA",
    "llama_tensor_shapes",
    "make_demo",
    "make_tiny_llama",
]

TINY_LLAMA: dict = dict(
    architectures=["LlamaForCausalLM"],
    model_type="llama",
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    hidden_act="silu",
    attention_bias=False,
    mlp_bias=False,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    torch_dtype="bfloat16",
)

DEMO_SPEC = """\
# A DARE merge of two fine-tunes onto their base (see README.md).
base = model("base")
ft0  = model("ft0")
ft1  = model("ft1")

output base + avg(dare(ft0 - base, p=0.9), dare(ft1 - base, p=0.9))
"""

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_BASE_STD = 0.02


def llama_tensor_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every weight of a LlamaForCausalLM with this config, name -> shape, in transformers' order.

    >>> shapes = llama_tensor_shapes(TINY_LLAMA)
    >>> shapes["model.layers.0.self_attn.k_proj.weight"]
    (16, 32)
    >>> list(shapes)[-1]
    'lm_head.weight'
    """
    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    inter = config["intermediate_size"]
    vocab = config["vocab_size"]
    attn_bias = bool(config.get("attention_bias", False))
    mlp_bias = bool(config.get("mlp_bias", False))

    def linear(prefix: str, out_features: int, in_features: int, bias: bool) -> None:
        shapes[f"{prefix}.weight"] = (out_features, in_features)
        if bias:
            shapes[f"{prefix}.bias"] = (out_features,)

    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(config["num_hidden_layers"]):
        layer = f"model.layers.{i}"
        linear(f"{layer}.self_attn.q_proj", heads * head_dim, hidden, attn_bias)
        linear(f"{layer}.self_attn.k_proj", kv_heads * head_dim, hidden, attn_bias)
        linear(f"{layer}.self_attn.v_proj", kv_heads * head_dim, hidden, attn_bias)
        linear(f"{layer}.self_attn.o_proj", hidden, heads * head_dim, attn_bias)
        linear(f"{layer}.mlp.gate_proj", inter, hidden, mlp_bias)
        linear(f"{layer}.mlp.up_proj", inter, hidden, mlp_bias)
        linear(f"{layer}.mlp.down_proj", hidden, inter, mlp_bias)
        shapes[f"{layer}.input_layernorm.weight"] = (hidden,)
        shapes[f"{layer}.post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    if not config.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _is_norm(name: str) -> bool:
    return name.endswith("norm.weight")


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors checkpoint folder, sharded or not."""
    index = folder / INDEX_FILE
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / SINGLE_FILE).is_file():
        files = [SINGLE_FILE]
    else:
        raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {folder}")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(folder / file, framework="pt") as f:
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
    return tensors


def _random_weights(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for name, shape in shapes.items():
        w = torch.randn(shape, generator=gen, dtype=torch.float32) * _BASE_STD
        if _is_norm(name):
            w += 1.0
        weights[name] = w
    return weights


def _finetuned_weights(
    base: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]], seed: int, delta_std: float
) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for name, shape in shapes.items():
        if name not in base:
            raise ValueError(f"the base checkpoint has no tensor {name!r}")
        b = base[name]
        if tuple(b.shape) != shape:
            raise ValueError(f"base tensor {name!r} has shape {tuple(b.shape)}, expected {shape}")
        noise = torch.randn(shape, generator=gen, dtype=torch.float32) * delta_std
        weights[name] = b.to(torch.float32) + noise
    return weights


def _shard(names: list[str], nbytes: dict[str, int], shard_size: int | None) -> list[list[str]]:
    """Split names, in order, into groups of at most shard_size bytes (a larger tensor gets its own)."""
    if shard_size is None or sum(nbytes.values()) <= shard_size:
        return [names]
    shards: list[list[str]] = [[]]
    used = 0
    for name in names:
        if shards[-1] and used + nbytes[name] > shard_size:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += nbytes[name]
    return shards


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def make_tiny_llama(
    folder: Path,
    *,
    seed: int,
    config: dict | None = None,
    base: Path | None = None,
    delta_std: float = 0.005,
    dtype: torch.dtype = torch.bfloat16,
    shard_size: int | None = None,
) -> Path:
    """Write a tiny Llama checkpoint (config.json, generation_config.json, safetensors) into folder.

    Without base, weights are N(0, 0.02) (norm weights 1 + N(0, 0.02)). With base, the checkpoint is a
    fine-tune of it: the base's weights plus N(0, delta_std) noise, and config defaults to the base's.
    With shard_size (bytes), weights over that size are split into model-0000k-of-0000N.safetensors
    files with a model.safetensors.index.json. The same arguments always write the same bytes.
    """
    folder = Path(folder)
    if shard_size is not None and shard_size <= 0:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    if delta_std < 0:
        raise ValueError(f"delta_std must be >= 0, got {delta_std}")
    if config is None:
        if base is not None and (Path(base) / "config.json").is_file():
            config = json.loads((Path(base) / "config.json").read_text())
        else:
            config = TINY_LLAMA
    config = dict(config)
    config["torch_dtype"] = config["dtype"] = _dtype_name(dtype)
    shapes = llama_tensor_shapes(config)

    if base is None:
        weights = _random_weights(shapes, seed)
    else:
        weights = _finetuned_weights(_read_weights(Path(base)), shapes, seed, delta_std)
    weights = {name: w.to(dtype).contiguous() for name, w in weights.items()}

    folder.mkdir(parents=True, exist_ok=True)
    for stale in [*folder.glob("model*.safetensors"), folder / INDEX_FILE]:
        stale.unlink(missing_ok=True)

    _write_json(folder / "config.json", config)
    generation = {"_from_model_config": True}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if config.get(key) is not None:
            generation[key] = config[key]
    _write_json(folder / "generation_config.json", generation)

    names = list(shapes)
    nbytes = {name: weights[name].numel() * weights[name].element_size() for name in names}
    shards = _shard(names, nbytes, shard_size)
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(weights, str(folder / SINGLE_FILE), metadata=metadata)
        return folder

    weight_map = {}
    for k, shard in enumerate(shards, start=1):
        file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file({name: weights[name] for name in shard}, str(folder / file), metadata=metadata)
        weight_map.update({name: file for name in shard})
    _write_json(
        folder / INDEX_FILE,
        {"metadata": {"total_size": sum(nbytes.values())}, "weight_map": weight_map},
    )
    return folder


def make_demo(folder: Path) -> Path:
    """Write a base model, two fine-tunes of it and the demo spec into folder; return the spec's path."""
    folder = Path(folder)
    base = make_tiny_llama(folder / "base", seed=0)
    make_tiny_llama(folder / "ft0", seed=1, base=base)
    make_tiny_llama(folder / "ft1", seed=2, base=base)
    spec = folder / "spec.ml"
    spec.write_text(DEMO_SPEC)
    return spec
