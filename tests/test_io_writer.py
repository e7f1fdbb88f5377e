"""Sharded writing, compared against the safetensors library (and transformers)."""

from __future__ import annotations

import errno
import json
import os
import random
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from mergelang.arrays import to_numpy
from mergelang.io import (
    DTYPE_CODES,
    MODEL_FILES,
    Checkpoint,
    CheckpointError,
    OutputTensor,
    ShardedWriter,
    copy_model_files,
    itemsize,
    plan_shards,
    shard_file_names,
)


def random_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "model.embed_tokens.weight": torch.randn(17, 8, generator=g).to(torch.bfloat16),
        "model.layers.0.mlp.down_proj.weight": torch.randn(9, 5, generator=g).to(torch.bfloat16),
        "model.layers.0.input_layernorm.weight": torch.randn(31, generator=g),
        "model.layers.0.self_attn.o_proj.weight": torch.randn(6, 7, generator=g).to(torch.float16),
        "rotary.inv_freq": torch.randn(13, generator=g, dtype=torch.float64),
        "position_ids": torch.randint(-(2**40), 2**40, (3, 5), generator=g),
        "mask": torch.rand(23, generator=g) > 0.5,
        "quantized": torch.randint(-128, 127, (19,), generator=g, dtype=torch.int8),
        "fp8": torch.randn(11, generator=g).to(torch.float8_e4m3fn),
        "scale": torch.tensor(0.25),
        "empty": torch.empty(0, 4, dtype=torch.bfloat16),
        "lm_head.weight": torch.randn(16, 8, generator=g).to(torch.bfloat16),
    }


def specs(tensors: dict[str, torch.Tensor]) -> list[OutputTensor]:
    return [OutputTensor(name, DTYPE_CODES[t.dtype], tuple(t.shape)) for name, t in tensors.items()]


def uneven_chunks(tensors: dict[str, torch.Tensor], seed: int) -> list[tuple[str, int, torch.Tensor]]:
    """Every tensor cut at random points into chunks of uneven sizes, all chunks shuffled together."""
    rng = random.Random(seed)
    chunks = []
    for name, tensor in tensors.items():
        flat = tensor.reshape(-1)
        n = flat.numel()
        cuts = sorted({0, n, *(rng.randrange(n + 1) for _ in range(rng.randrange(4)))})
        chunks += [(name, a, flat[a:b].clone()) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
        if n == 0:
            chunks.append((name, 0, flat.clone()))
    rng.shuffle(chunks)
    return chunks


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.itemsize == 1 and a.dtype not in (torch.bool, torch.int8, torch.uint8):
        return torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    return torch.equal(a, b)


def load_all(files: list[Path]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in files:
        loaded = load_file(str(file))
        assert not set(loaded) & set(out)
        out.update(loaded)
    return out


@pytest.mark.parametrize(("shard_size", "seed"), [(10**9, 0), (300, 1), (1, 2)])
def test_chunked_shuffled_writes_match_safetensors(tmp_path: Path, shard_size: int, seed: int):
    tensors = random_tensors()
    writer = ShardedWriter(tmp_path / "out", specs(tensors), shard_size)
    with writer:
        for name, start, chunk in uneven_chunks(tensors, seed):
            writer.write(name, start, chunk)
    assert len(writer.files) == len(plan_shards(specs(tensors), shard_size))
    loaded = load_all(writer.files)
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert same(loaded[name], tensor), name
    with Checkpoint.open(tmp_path / "out") as ckpt:
        for name, tensor in tensors.items():
            assert same(ckpt.read(name).reshape(tensor.shape), tensor), name


def test_numpy_chunks_in_the_dtypes_numpy_view_match_safetensors(tmp_path: Path):
    """The loops' chunks are numpy arrays (a bfloat16 as its uint16 bits: arrays.to_numpy): written
    as such, every dtype gives the bytes safetensors writes from the tensors."""
    tensors = random_tensors()
    with ShardedWriter(tmp_path, specs(tensors), 300) as writer:
        for name, start, chunk in uneven_chunks(tensors, 4):
            writer.write(name, start, to_numpy(chunk))
    loaded = load_all(writer.files)
    for name, tensor in tensors.items():
        assert same(loaded[name], tensor), name


def test_concurrent_writes_match_safetensors(tmp_path: Path):
    tensors = random_tensors()
    with ShardedWriter(tmp_path, specs(tensors), 200) as writer:
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(lambda c: writer.write(*c), uneven_chunks(tensors, 3)))
    loaded = load_all(writer.files)
    for name, tensor in tensors.items():
        assert same(loaded[name], tensor), name


def test_writeback_starts_every_step_of_bytes_and_the_files_are_unchanged(tmp_path: Path, monkeypatch):
    """Without direct I/O, each shard's bytes (header, then data) are handed to the disk every
    WRITEBACK_BYTES written (the final fsync then waits for the rest only); the real system call
    runs too, and the bytes are those written."""
    from mergelang.io import output_file

    started: list[int] = []
    real = output_file._start_writeback
    monkeypatch.setattr(output_file, "WRITEBACK_BYTES", 100)
    monkeypatch.setattr(output_file, "_start_writeback", lambda fd: (started.append(fd), real(fd) if real else None))
    tensors = random_tensors()
    expected: list[int] = []  # the rule replayed: per shard, a start whenever 100 bytes accumulate
    pending: dict[int, int] = {}

    def replay(fd: int, nbytes: int) -> None:
        pending[fd] = pending.get(fd, 0) + nbytes
        if pending[fd] >= 100:
            pending[fd] = 0
            expected.append(fd)

    with ShardedWriter(tmp_path, specs(tensors), 300, direct_io=False) as writer:
        for shard in writer._shards:
            assert not shard.file.direct
            replay(shard.file.fd, len(shard.header))
        for name, start, chunk in uneven_chunks(tensors, 4):
            writer.write(name, start, chunk)
            replay(writer._slots[name].shard.file.fd, chunk.numel() * chunk.dtype.itemsize)
    assert len(set(expected)) > 1 and started == expected
    loaded = load_all(writer.files)
    for name, tensor in tensors.items():
        assert same(loaded[name], tensor), name


def test_header_layout_passes_safe_open(tmp_path: Path):
    tensors = random_tensors()
    plan = plan_shards(specs(tensors), 400)
    with ShardedWriter(tmp_path, specs(tensors), 400) as writer:
        for name, tensor in tensors.items():
            writer.write(name, 0, tensor.reshape(-1))
    assert [p.name for p in writer.files] == shard_file_names(len(plan))
    for file, group in zip(writer.files, plan, strict=True):
        raw = file.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        assert n % 8 == 0
        header = json.loads(raw[8 : 8 + n])
        assert header.pop("__metadata__") == {"format": "pt"}
        assert set(header) == {t.name for t in group}
        spans = sorted(tuple(entry["data_offsets"]) for entry in header.values())
        assert spans[0][0] == 0 and spans[-1][1] == len(raw) - 8 - n
        assert all(a[1] == b[0] for a, b in zip(spans[:-1], spans[1:], strict=True))
        for entry in header.values():
            assert (8 + n + entry["data_offsets"][0]) % itemsize(entry["dtype"]) == 0
        with safe_open(str(file), framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            assert set(f.keys()) == {t.name for t in group}
            for name in f.keys():
                assert same(f.get_tensor(name), tensors[name])


def test_custom_metadata_keeps_format(tmp_path: Path):
    with ShardedWriter(tmp_path, [OutputTensor("a", "F32", (2,))], 100, metadata={"merged_by": "x"}) as writer:
        writer.write("a", 0, torch.tensor([1.0, 2.0]))
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "merged_by": "x"}


def test_no_tensors_writes_an_empty_file(tmp_path: Path):
    with ShardedWriter(tmp_path, [], 100) as writer:
        pass
    assert writer.files == [tmp_path / "model.safetensors"]
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert list(f.keys()) == [] and f.metadata() == {"format": "pt"}


def u8(name: str, nbytes: int) -> OutputTensor:
    return OutputTensor(name, "U8", (nbytes,))


def names(plan: list[list[OutputTensor]]) -> list[list[str]]:
    return [[t.name for t in group] for group in plan]


@pytest.mark.parametrize(
    ("sizes", "shard_size", "expected"),
    [
        ([4, 4, 4], 8, [["a", "b"], ["c"]]),
        ([4, 4, 4], 12, [["a", "b", "c"]]),
        ([4, 20, 4], 8, [["a"], ["b"], ["c"]]),
        ([20, 4, 4], 8, [["a"], ["b", "c"]]),
        ([3, 6, 2, 1, 5], 8, [["a"], ["b", "c"], ["d", "e"]]),
        ([8, 0, 8], 8, [["a", "b"], ["c"]]),
        ([1, 1, 1, 1], 1, [["a"], ["b"], ["c"], ["d"]]),
        ([], 8, []),
    ],
)
def test_plan_shards_examples(sizes, shard_size, expected):
    tensors = [u8(chr(ord("a") + i), size) for i, size in enumerate(sizes)]
    assert names(plan_shards(tensors, shard_size)) == expected


def test_plan_shards_counts_bytes_not_elements():
    tensors = [OutputTensor("a", "BF16", (2, 2)), OutputTensor("b", "F32", (2,)), OutputTensor("c", "I64", ())]
    assert [t.nbytes for t in tensors] == [8, 8, 8]
    assert names(plan_shards(tensors, 16)) == [["a", "b"], ["c"]]
    with pytest.raises(ValueError, match="shard_size must be a positive number of bytes, got 0"):
        plan_shards(tensors, 0)


def test_shard_file_names():
    assert shard_file_names(1) == ["model.safetensors"]
    assert shard_file_names(3) == [
        "model-00001-of-00003.safetensors",
        "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors",
    ]
    assert shard_file_names(12)[10] == "model-00011-of-00012.safetensors"
    with pytest.raises(ValueError):
        shard_file_names(0)


def test_index_json_content(tmp_path: Path):
    tensors = {"b": torch.arange(10, dtype=torch.uint8), "a": torch.ones(3), "c": torch.zeros(2, 5, dtype=torch.int16)}
    with ShardedWriter(tmp_path, specs(tensors), 32) as writer:
        for name, tensor in tensors.items():
            writer.write(name, 0, tensor.reshape(-1))
    assert writer.total_bytes == 10 + 12 + 20
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    ]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index == {
        "metadata": {"total_size": 42},
        "weight_map": {
            "b": "model-00001-of-00002.safetensors",
            "a": "model-00001-of-00002.safetensors",
            "c": "model-00002-of-00002.safetensors",
        },
    }
    loaded = load_all(writer.files)
    for name, tensor in tensors.items():
        assert same(loaded[name], tensor)


def test_single_shard_has_no_index(tmp_path: Path):
    tensors = {"a": torch.ones(3), "b": torch.arange(4)}
    with ShardedWriter(tmp_path, specs(tensors), 10**6) as writer:
        for name, tensor in tensors.items():
            writer.write(name, 0, tensor)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    loaded = load_file(str(tmp_path / "model.safetensors"))
    assert all(same(loaded[n], t) for n, t in tensors.items())


def test_close_with_missing_chunk_raises(tmp_path: Path):
    tensors = {"a": torch.ones(3), "b": torch.arange(10.0)}
    writer = ShardedWriter(tmp_path, specs(tensors), 10**6)
    writer.open()
    writer.write("a", 0, tensors["a"])
    writer.write("b", 0, tensors["b"][:4])
    writer.write("b", 7, tensors["b"][7:])
    with pytest.raises(RuntimeError, match=r"tensor 'b' is incomplete: elements \[4, 7\) of 10 were never written"):
        writer.close()
    with pytest.raises(RuntimeError, match="aborted"):
        writer.write("b", 4, tensors["b"][4:7])


def test_repeated_chunk_does_not_count_as_coverage(tmp_path: Path):
    writer = ShardedWriter(tmp_path, [OutputTensor("a", "F32", (4,))], 100)
    writer.open()
    writer.write("a", 0, torch.ones(2))
    writer.write("a", 0, torch.ones(2))
    with pytest.raises(RuntimeError, match=r"tensor 'a' is incomplete: elements \[2, 4\) of 4"):
        writer.close()


def test_write_checks(tmp_path: Path):
    writer = ShardedWriter(tmp_path, [OutputTensor("w", "BF16", (2, 3))], 100)
    with pytest.raises(RuntimeError, match="not open yet"):
        writer.write("w", 0, torch.zeros(6, dtype=torch.bfloat16))
    with writer:
        with pytest.raises(ValueError, match=r"'w' is stored as BF16 \(torch.bfloat16\), got data of torch.float32"):
            writer.write("w", 0, torch.zeros(6))
        with pytest.raises(ValueError, match=r"elements \[4, 7\) are out of bounds for 6 elements"):
            writer.write("w", 4, torch.zeros(3, dtype=torch.bfloat16))
        with pytest.raises(ValueError, match="contiguous"):
            writer.write("w", 0, torch.zeros(12, dtype=torch.bfloat16)[::2])
        with pytest.raises(KeyError, match="'nope'"):
            writer.write("nope", 0, torch.zeros(1, dtype=torch.bfloat16))
        with pytest.raises(ValueError, match=r"'w' is stored as BF16 \(uint16\), got data of float32"):
            writer.write("w", 0, np.zeros(6, dtype=np.float32))
        with pytest.raises(ValueError, match="contiguous"):
            writer.write("w", 0, np.zeros(12, dtype=np.uint16)[::2])
        data = torch.arange(6).to(torch.bfloat16)
        writer.write("w", 0, data[:3])
        writer.write("w", 3, to_numpy(data[3:]))
    assert torch.equal(load_file(str(tmp_path / "model.safetensors"))["w"], data.reshape(2, 3))


def test_constructor_checks(tmp_path: Path):
    with pytest.raises(ValueError, match="'a' is listed twice"):
        ShardedWriter(tmp_path, [OutputTensor("a", "F32", (1,)), OutputTensor("a", "F32", (1,))], 10)
    with pytest.raises(ValueError, match="unknown dtype 'F4'"):
        ShardedWriter(tmp_path, [OutputTensor("a", "F4", (1,))], 10)
    with pytest.raises(ValueError, match="metadata must map strings to strings"):
        ShardedWriter(tmp_path, [], 10, metadata={"n": 1})


def test_exception_inside_context_aborts(tmp_path: Path):
    tensors = {"a": torch.ones(3), "b": torch.zeros(3)}
    with pytest.raises(ZeroDivisionError):
        with ShardedWriter(tmp_path, specs(tensors), 12) as writer:
            writer.write("a", 0, tensors["a"])
            raise ZeroDivisionError
    assert not (tmp_path / "model.safetensors.index.json").exists()
    with pytest.raises(RuntimeError, match="aborted"):
        writer.close()


def test_open_sets_final_sizes(tmp_path: Path):
    tensors = random_tensors()
    writer = ShardedWriter(tmp_path, specs(tensors), 500)
    writer.open()
    sizes = [f.stat().st_size for f in writer.files]
    writer.abort()
    with ShardedWriter(tmp_path / "full", specs(tensors), 500) as full:
        for name, tensor in tensors.items():
            full.write(name, 0, tensor.reshape(-1))
    assert sizes == [f.stat().st_size for f in full.files]


def test_full_disk_fails_at_open(tmp_path: Path, monkeypatch):
    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_space, raising=False)
    writer = ShardedWriter(tmp_path, [OutputTensor("a", "F32", (4,))], 100)
    with pytest.raises(OSError) as exc_info:
        writer.open()
    assert exc_info.value.errno == errno.ENOSPC
    with pytest.raises(RuntimeError, match="aborted"):
        writer.write("a", 0, torch.ones(4))


def test_fallocate_unsupported_is_ignored(tmp_path: Path, monkeypatch):
    def unsupported(fd, offset, length):
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(os, "posix_fallocate", unsupported, raising=False)
    with ShardedWriter(tmp_path, [OutputTensor("a", "F32", (4,))], 100) as writer:
        writer.write("a", 0, torch.arange(4.0))
    assert torch.equal(load_file(str(tmp_path / "model.safetensors"))["a"], torch.arange(4.0))


def test_transformers_loads_sharded_output(tmp_path: Path):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    with ShardedWriter(tmp_path, specs(state), 3000) as writer:
        for name, start, chunk in uneven_chunks(state, 4):
            writer.write(name, start, chunk)
    assert len(writer.files) > 1
    config.save_pretrained(tmp_path)
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, state[name]), name


# ---- model files ---------------------------------------------------------------------------

CONFIG_TEXT = """{
  "architectures": ["LlamaForCausalLM"],
  "dtype": "float32",
  "hidden_size": 16,
  "torch_dtype": "float32",
  "rope_scaling": {"type": "linear", "factor": 2.0},
  "name": "caf\u00e9"
}
"""

CONFIG_BF16 = """{
  "architectures": [
    "LlamaForCausalLM"
  ],
  "dtype": "bfloat16",
  "hidden_size": 16,
  "torch_dtype": "bfloat16",
  "rope_scaling": {
    "type": "linear",
    "factor": 2.0
  },
  "name": "caf\u00e9"
}
"""


@pytest.fixture
def model_src(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(CONFIG_TEXT, encoding="utf-8")
    (src / "tokenizer.json").write_text('{"model": {"type": "BPE"}}')
    (src / "merges.txt").write_text("a b\n")
    (src / "chat_template.jinja").write_text("{{ messages }}")
    (src / "README.md").write_text("not copied")
    (src / "model.safetensors").write_bytes(b"not copied")
    return src


def test_copy_model_files(model_src: Path, tmp_path: Path):
    dst = tmp_path / "dst"
    copied = copy_model_files(model_src, dst)
    assert copied == ["config.json", "tokenizer.json", "merges.txt", "chat_template.jinja"]
    assert copied == [name for name in MODEL_FILES if (model_src / name).exists()]
    assert sorted(p.name for p in dst.iterdir()) == sorted(copied)
    for name in copied:
        assert (dst / name).read_bytes() == (model_src / name).read_bytes()


def test_copy_model_files_rewrites_dtype(model_src: Path, tmp_path: Path):
    dst = tmp_path / "dst"
    copied = copy_model_files(model_src, dst, dtype_name="bfloat16")
    assert "config.json" in copied
    assert (dst / "config.json").read_text(encoding="utf-8") == CONFIG_BF16
    assert (dst / "tokenizer.json").read_bytes() == (model_src / "tokenizer.json").read_bytes()


def test_copy_model_files_adds_torch_dtype(tmp_path: Path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text('{"hidden_size": 16}')
    copy_model_files(src, tmp_path / "dst", dtype_name="float16")
    assert (tmp_path / "dst" / "config.json").read_text() == '{\n  "hidden_size": 16,\n  "torch_dtype": "float16"\n}\n'


def test_copy_model_files_broken_config(tmp_path: Path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text('{"hidden_size": ')
    with pytest.raises(CheckpointError, match="config.json is not valid JSON") as exc_info:
        copy_model_files(src, tmp_path / "dst", dtype_name="float16")
    assert exc_info.value.path == src / "config.json"
