"""Checkpoint reading, compared against the safetensors library."""

from __future__ import annotations

import json
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from mergelang.arrays import NUMPY_DTYPES
from mergelang.io import DTYPE_CODES, DTYPES, Checkpoint, CheckpointError, itemsize, read_header
from mergelang.io.safetensors_format import ITEMSIZES, decode_floats


def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.embed_tokens.weight": torch.randn(11, 6, generator=g).to(torch.bfloat16),
        "model.layers.0.mlp.up_proj.weight": torch.randn(5, 7, generator=g).to(torch.float16),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(3, 4, 5, generator=g),
        "model.layers.0.input_layernorm.weight": torch.randn(9, generator=g, dtype=torch.float64),
        "position_ids": torch.randint(-(2**40), 2**40, (13,), generator=g),
        "int8s": torch.randint(-128, 127, (2, 3), generator=g, dtype=torch.int8),
        "bytes": torch.randint(0, 255, (17,), generator=g, dtype=torch.uint8),
        "mask": torch.rand(10, generator=g) > 0.5,
        "scale": torch.tensor(0.125),
        "step": torch.tensor(7, dtype=torch.int32),
        "empty": torch.empty(0, 3),
        "empty_bf16": torch.empty(4, 0, dtype=torch.bfloat16),
    }


def write_raw(path: Path, header: dict | bytes, data: bytes = b"", length: int | None = None) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    n = len(raw) if length is None else length
    path.write_bytes(struct.pack("<Q", n) + raw + data)
    return path


def header_order(path: Path) -> list[str]:
    """Tensor names sorted by data offset, read straight from the file's JSON header."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header.pop("__metadata__", None)
    return [name for name, _ in sorted(header.items(), key=lambda kv: tuple(kv[1]["data_offsets"]))]


@pytest.fixture
def single(tmp_path: Path) -> Path:
    folder = tmp_path / "ft0"
    folder.mkdir()
    save_file(sample_tensors(), str(folder / "model.safetensors"), metadata={"format": "pt", "note": "x"})
    return folder


def test_dtype_tables_are_consistent():
    for code, dtype in DTYPES.items():
        assert DTYPE_CODES[dtype] == code
        assert itemsize(code) == torch.empty(0, dtype=dtype).element_size()
    assert itemsize("BF16") == 2 and itemsize("F8_E4M3") == 1 and itemsize("I64") == 8
    assert set(DTYPES) == set(ITEMSIZES)  # every code has its torch dtype
    with pytest.raises(ValueError, match="unknown safetensors dtype 'F4'"):
        itemsize("F4")


def test_read_whole_tensors_matches_safetensors(single: Path):
    reference = load_file(str(single / "model.safetensors"))
    with Checkpoint.open(single) as ckpt:
        assert set(ckpt.tensors) == set(reference)
        assert ckpt.files == [single / "model.safetensors"]
        assert ckpt.config is None
        for name, ref in reference.items():
            info = ckpt.tensors[name]
            assert info.shape == tuple(ref.shape)
            assert info.dtype == DTYPE_CODES[ref.dtype]
            assert info.numel == ref.numel()
            assert info.nbytes == ref.numel() * ref.element_size()
            got = ckpt.read(name)
            assert got.dtype == ref.dtype
            assert got.shape == (ref.numel(),)
            assert torch.equal(got, ref.reshape(-1))


def test_read_floats_is_torchs_float32(single: Path, tmp_path: Path):
    """read_floats (numpy, no torch) gives each entry's float32 as torch's .to(torch.float32) does:
    bf16, f16 and f32 exactly, f64 rounded to nearest; with infinities, signed zeros, subnormals and
    float64s halfway between two float32s. A NaN stays a NaN (numpy and torch widen an f16 NaN's
    payload differently)."""
    special = [0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-45, 6e-8, -65504.0, 3.0e38]
    halfway = [1 + 2.0**-24, 1 + 3 * 2.0**-24, -(1 + 2.0**-24), 1e39, 2.0**-150]
    tensors = {code: torch.tensor(special + halfway if code == "F64" else special, dtype=torch.float64).to(DTYPES[code])
               for code in ("BF16", "F16", "F32", "F64")}
    tensors |= {f"rand_{c}": torch.randn(300, generator=torch.Generator().manual_seed(1)).to(DTYPES[c])
                for c in ("BF16", "F16", "F64")}
    folder = tmp_path / "floats"
    folder.mkdir()
    save_file(tensors, str(folder / "model.safetensors"))
    with Checkpoint.open(folder) as ckpt:
        for name, ref in tensors.items():
            n = ref.numel()
            for start, stop in ((0, n), (1, n - 1), (n, n)):
                got = ckpt.read_floats(name, start, stop)
                want = ref[start:stop].to(torch.float32).numpy()
                nan = np.isnan(want)
                assert got.dtype == want.dtype and (np.isnan(got) == nan).all(), (name, start, stop)
                assert got[~nan].tobytes() == want[~nan].tobytes(), (name, start, stop)
        with pytest.raises(ValueError, match="not a float dtype: 'I64'"):
            decode_floats("I64", b"")


def test_read_ranges_matches_safetensors(single: Path):
    reference = load_file(str(single / "model.safetensors"))
    with Checkpoint.open(single) as ckpt:
        for name, ref in reference.items():
            flat = ref.reshape(-1)
            n = flat.numel()
            ranges = {(0, n), (0, 0), (n, n), (0, n // 2), (n // 3, n), (n // 3, max(n // 3, n - 1))}
            for start, stop in ranges:
                got = ckpt.read(name, start, stop)
                assert got.dtype == ref.dtype
                assert torch.equal(got, flat[start:stop]), (name, start, stop)
                array = ckpt.read_array(name, start, stop)  # numpy, in the dtype's numpy view: the same bits
                assert array.dtype == NUMPY_DTYPES[ckpt.tensors[name].dtype] and array.flags.writeable
                assert array.tobytes() == flat[start:stop].contiguous().view(torch.uint8).numpy().tobytes()
            assert torch.equal(ckpt.read(name, n // 2), flat[n // 2 :])


def test_read_returns_a_fresh_buffer(single: Path):
    path = single / "model.safetensors"
    before = path.read_bytes()
    with Checkpoint.open(single) as ckpt:
        a = ckpt.read("bytes")
        a.zero_()
        assert torch.equal(ckpt.read("bytes"), load_file(str(path))["bytes"])
    assert path.read_bytes() == before  # a write to a mapped read copies the page, never the file


def _mappings_of(path: Path) -> int:
    return sum(line.rstrip().endswith(str(path)) for line in Path("/proc/self/maps").read_text().splitlines())


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="counts mappings in /proc/self/maps")
def test_reads_are_mapped_until_freed(single: Path):
    path = single / "model.safetensors"
    reference = load_file(str(path))
    ckpt = Checkpoint.open(single)
    before = _mappings_of(path)
    a = ckpt.read("model.layers.0.self_attn.q_proj.weight")
    view = a[1:]
    assert _mappings_of(path) == before + 1
    ckpt.close()  # the mapping outlives the file descriptor
    assert torch.equal(view, reference["model.layers.0.self_attn.q_proj.weight"].reshape(-1)[1:])
    del a
    assert _mappings_of(path) == before + 1  # a view holds it
    del view
    assert _mappings_of(path) == before


def test_a_mapped_read_reads_its_range_ahead_without_holding_the_gil(tmp_path: Path, monkeypatch):
    """A mapped read advises MADV_WILLNEED over its mapping through libc (the call releases the
    GIL): of the file's 24 MB, evicted, the start comes back into the page cache (one read-ahead
    window) before any page is touched; with the advice taken away, nothing does."""
    import time

    import mergelang.io.checkpoint as checkpoint
    from test_prefetch import resident_pages

    if checkpoint._MADVISE is None:
        pytest.skip("no libc madvise here")
    save_file({"w": torch.arange(6 << 20, dtype=torch.float32)}, str(tmp_path / "model.safetensors"))
    path = tmp_path / "model.safetensors"

    def evicted() -> bool:
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
        return resident_pages(path)[0] == 0

    def resident_after_read() -> int:
        ckpt = Checkpoint.open(tmp_path)  # reads the header: its page comes back
        assert evicted()
        held = ckpt.read("w")  # mapped, not touched
        time.sleep(0.5)
        found = resident_pages(path)[0]
        del held
        ckpt.close()
        return found

    if not evicted():
        pytest.skip("this file system keeps the file in memory whatever is advised")
    assert resident_after_read() >= 256  # 1 MB at least
    monkeypatch.setattr(checkpoint, "_MADVISE", lambda address, length, advice: 0)  # advice not given
    assert resident_after_read() <= 1  # the header's page, read by open


def test_unmappable_file_is_read_with_pread(single: Path, monkeypatch):
    import mergelang.io.checkpoint as checkpoint

    def refuse(*args, **kwargs):
        raise OSError(19, "No such device")  # ENODEV: what mmap says on a file system without it

    monkeypatch.setattr(checkpoint.mmap, "mmap", refuse)
    reference = load_file(str(single / "model.safetensors"))
    with Checkpoint.open(single) as ckpt:
        for name, ref in reference.items():
            flat = ref.reshape(-1)
            assert torch.equal(ckpt.read(name), flat), name
            assert torch.equal(ckpt.read(name, flat.numel() // 3), flat[flat.numel() // 3:]), name


def test_entries_misaligned_in_the_file_are_copied(tmp_path: Path):
    values = torch.arange(-6, 7, dtype=torch.float16)
    data = values.numpy().tobytes()
    header = json.dumps({"x": {"dtype": "F16", "shape": [13], "data_offsets": [0, len(data)]}}).encode()
    header += b" " * (1 - len(header) % 2)  # an odd length: every entry starts at an odd byte
    folder = tmp_path / "odd"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + data)
    with Checkpoint.open(folder) as ckpt:
        assert ckpt.tensors["x"].start % 2 == 1
        whole, part = ckpt.read("x"), ckpt.read("x", 5, 9)
        assert torch.equal(whole, values) and torch.equal(part, values[5:9])
        assert whole.data_ptr() % 2 == 0 and part.data_ptr() % 2 == 0  # as loops and kernels expect


def test_read_out_of_range_and_unknown_name(single: Path):
    with Checkpoint.open(single) as ckpt:
        with pytest.raises(ValueError, match=r"range \[5, 200\) is out of bounds .* 17 elements"):
            ckpt.read("bytes", 5, 200)
        with pytest.raises(ValueError, match="out of bounds"):
            ckpt.read("bytes", 6, 5)
        with pytest.raises(KeyError, match="no tensor named 'nope'"):
            ckpt.read("nope")


def test_tensors_are_in_data_offset_order(single: Path):
    path = single / "model.safetensors"
    tensors, metadata = read_header(path)
    assert list(tensors) == header_order(path)
    assert metadata == {"format": "pt", "note": "x"}
    starts = [t.start for t in tensors.values()]
    assert starts == sorted(starts)
    assert list(Checkpoint.open(single).tensors) == header_order(path)


def test_read_header_offsets_are_absolute(single: Path):
    path = single / "model.safetensors"
    raw = path.read_bytes()
    reference = load_file(str(path))
    for name, info in read_header(path)[0].items():
        assert info.path == path
        chunk = bytearray(raw[info.start : info.start + info.nbytes])
        ref = reference[name]
        if ref.numel():
            assert torch.equal(torch.frombuffer(chunk, dtype=ref.dtype), ref.reshape(-1))


def test_read_header_without_metadata(tmp_path: Path):
    path = tmp_path / "m.safetensors"
    save_file({"a": torch.ones(2)}, str(path))
    tensors, metadata = read_header(path)
    assert metadata == {}
    assert list(tensors) == ["a"]


def test_concurrent_reads_match(single: Path):
    reference = load_file(str(single / "model.safetensors"))
    jobs = [(name, i) for name in reference for i in range(reference[name].numel() + 1)]

    with Checkpoint.open(single) as ckpt:

        def job(item):
            name, i = item
            return torch.equal(ckpt.read(name, i), reference[name].reshape(-1)[i:])

        with ThreadPoolExecutor(max_workers=8) as pool:
            assert all(pool.map(job, jobs))


def test_read_after_close_reopens(single: Path):
    ckpt = Checkpoint.open(single)
    first = ckpt.read("position_ids")
    ckpt.close()
    assert torch.equal(ckpt.read("position_ids"), first)
    ckpt.close()


def test_single_other_safetensors_file_and_config(tmp_path: Path):
    folder = tmp_path / "m"
    folder.mkdir()
    tensors = sample_tensors()
    save_file(tensors, str(folder / "weights.safetensors"))
    config = {"architectures": ["LlamaForCausalLM"], "torch_dtype": "bfloat16", "hidden_size": 6}
    (folder / "config.json").write_text(json.dumps(config))
    ckpt = Checkpoint.open(folder)
    assert ckpt.files == [folder / "weights.safetensors"]
    assert ckpt.config == config
    for name, ref in tensors.items():
        assert torch.equal(ckpt.read(name), ref.reshape(-1))


def make_sharded(folder: Path, tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """Three shards, given in an order that is not the file-name order, plus an index."""
    folder.mkdir()
    names = list(tensors)
    groups = {
        "model-00002-of-00003.safetensors": names[0:4],
        "model-00001-of-00003.safetensors": names[4:9],
        "model-00003-of-00003.safetensors": names[9:],
    }
    weight_map = {}
    for shard, members in groups.items():
        save_file({n: tensors[n] for n in members}, str(folder / shard), metadata={"format": "pt"})
        weight_map.update({n: shard for n in members})
    shuffled = dict(sorted(weight_map.items(), key=lambda kv: kv[0][::-1]))
    index = {"metadata": {"total_size": 1}, "weight_map": shuffled}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return weight_map


def test_sharded_checkpoint_matches_safetensors(tmp_path: Path):
    folder = tmp_path / "sharded"
    tensors = sample_tensors()
    weight_map = make_sharded(folder, tensors)
    shard_names = sorted(set(weight_map.values()))
    with Checkpoint.open(folder) as ckpt:
        assert ckpt.files == [folder / s for s in shard_names]
        assert list(ckpt.tensors) == [n for s in shard_names for n in header_order(folder / s)]
        for shard in shard_names:
            for name, ref in load_file(str(folder / shard)).items():
                assert ckpt.tensors[name].path == folder / shard
                got = ckpt.read(name)
                assert got.dtype == ref.dtype
                assert torch.equal(got, ref.reshape(-1))
                n = ref.numel()
                assert torch.equal(ckpt.read(name, n // 2, n), ref.reshape(-1)[n // 2 :])


def test_model_safetensors_is_preferred_over_an_index(tmp_path: Path):
    folder = tmp_path / "both"
    make_sharded(folder, sample_tensors())
    save_file({"only": torch.zeros(3)}, str(folder / "model.safetensors"))
    assert list(Checkpoint.open(folder).tensors) == ["only"]


# ---- header errors -------------------------------------------------------------------------


def assert_error(exc_info, path: Path, *fragments: str, tensor: str | None = None) -> None:
    err = exc_info.value
    assert isinstance(err, CheckpointError)
    text = str(err)
    assert err.path == path
    assert text.startswith(str(path))
    for fragment in fragments:
        assert fragment in text, (fragment, text)
    if tensor is not None:
        assert err.tensor == tensor
        assert f"tensor {tensor!r}" in text


def test_truncated_file(single: Path):
    path = single / "model.safetensors"
    raw = path.read_bytes()
    path.write_bytes(raw[:-3])
    last = header_order(path)[-1]
    with pytest.raises(CheckpointError) as exc_info:
        Checkpoint.open(single)
    assert_error(
        exc_info,
        path,
        f"data ends at byte {len(raw)} but the file has {len(raw) - 3} bytes (truncated?)",
        tensor=last,
    )


def test_truncated_after_open_is_a_short_read(single: Path):
    ckpt = Checkpoint.open(single)
    path = single / "model.safetensors"
    last = header_order(path)[-1]
    os.truncate(path, ckpt.tensors[last].start + 1)
    with pytest.raises(CheckpointError) as exc_info:
        ckpt.read(last)
    assert_error(exc_info, path, f"expected {ckpt.tensors[last].nbytes} bytes", "truncated", tensor=last)
    ckpt.close()


def test_file_shorter_than_length_prefix(tmp_path: Path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x01\x02\x03")
    with pytest.raises(CheckpointError) as exc_info:
        read_header(path)
    assert_error(exc_info, path, "expected at least 8 bytes", "the file has 3 bytes")


def test_header_length_beyond_file(tmp_path: Path):
    path = write_raw(
        tmp_path / "model.safetensors",
        {"a": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]}},
        b"\0" * 4,
        length=5000,
    )
    size = path.stat().st_size
    with pytest.raises(CheckpointError) as exc_info:
        read_header(path)
    assert_error(exc_info, path, "header length is 5000 bytes", f"only {size - 8} bytes", "truncated")


def test_absurd_header_length(tmp_path: Path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 2**40) + b"{}" * 8)
    with pytest.raises(CheckpointError) as exc_info:
        read_header(path)
    assert_error(exc_info, path, f"header length is {2**40} bytes", "limit", "not a safetensors file")


def test_garbage_json(tmp_path: Path):
    path = write_raw(tmp_path / "model.safetensors", b'{"a": {"dtype": "F32", ')
    with pytest.raises(CheckpointError) as exc_info:
        read_header(path)
    assert_error(exc_info, path, "header is not valid JSON")


def test_header_not_utf8(tmp_path: Path):
    path = write_raw(tmp_path / "model.safetensors", b'{"\xff\xfe": 1}')
    with pytest.raises(CheckpointError) as exc_info:
        read_header(path)
    assert_error(exc_info, path, "header is not valid UTF-8")


def test_header_not_an_object(tmp_path: Path):
    path = write_raw(tmp_path / "model.safetensors", [1, 2])
    with pytest.raises(CheckpointError) as exc_info:
        read_header(path)
    assert_error(exc_info, path, "header must be a JSON object, found list")


@pytest.mark.parametrize(
    ("entry", "fragments"),
    [
        ({"shape": [1], "data_offsets": [0, 4]}, ["missing dtype", "expected keys dtype, shape, data_offsets"]),
        ({"dtype": "F32", "data_offsets": [0, 4]}, ["missing shape"]),
        ({"dtype": "F32", "shape": [1]}, ["missing data_offsets"]),
        ({"dtype": 5, "shape": [1], "data_offsets": [0, 4]}, ["dtype must be a string, found int 5"]),
        ({"dtype": "F32", "shape": "1", "data_offsets": [0, 4]}, ["shape must be a list of non-negative integers"]),
        ({"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}, ["shape must be a list", "[-1]"]),
        ({"dtype": "F32", "shape": [1], "data_offsets": [4]}, ["data_offsets must be [begin, end]", "[4]"]),
        ({"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}, ["data_offsets must be [begin, end]"]),
        ("F32", ["expected an object with dtype, shape and data_offsets, found str"]),
    ],
)
def test_malformed_entry(tmp_path: Path, entry, fragments):
    path = write_raw(tmp_path / "model.safetensors", {"w": entry}, b"\0" * 4)
    with pytest.raises(CheckpointError) as exc_info:
        read_header(path)
    assert_error(exc_info, path, *fragments, tensor="w")


def test_unknown_dtype(tmp_path: Path):
    path = write_raw(
        tmp_path / "model.safetensors", {"w": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}, b"\0"
    )
    with pytest.raises(CheckpointError) as exc_info:
        read_header(path)
    assert_error(exc_info, path, "unknown dtype 'F4'", "expected one of F64, F32", "BF16", tensor="w")


def test_size_mismatch(tmp_path: Path):
    header = {"w": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 10]}}
    path = write_raw(tmp_path / "model.safetensors", header, b"\0" * 10)
    with pytest.raises(CheckpointError) as exc_info:
        read_header(path)
    assert_error(exc_info, path, "shape [2, 3] of dtype BF16 needs 12 bytes", "span 10 bytes", tensor="w")


def test_overlapping_ranges(tmp_path: Path):
    header = {
        "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]},
    }
    path = write_raw(tmp_path / "model.safetensors", header, b"\0" * 16)
    with pytest.raises(CheckpointError) as exc_info:
        read_header(path)
    assert_error(exc_info, path, "overlap tensor 'a'", "expected disjoint ranges", tensor="b")


def test_empty_tensors_do_not_overlap(tmp_path: Path):
    header = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "z": {"dtype": "F32", "shape": [0], "data_offsets": [4, 4]},
    }
    path = write_raw(tmp_path / "model.safetensors", header, b"\0" * 8)
    tensors, _ = read_header(path)
    assert [t.nbytes for t in tensors.values()] == [8, 0]


def test_non_string_metadata(tmp_path: Path):
    path = write_raw(tmp_path / "model.safetensors", {"__metadata__": {"format": 1}})
    with pytest.raises(CheckpointError) as exc_info:
        read_header(path)
    assert_error(exc_info, path, "__metadata__ must be an object mapping strings to strings")


def test_duplicate_tensor_name(tmp_path: Path):
    entry = '{"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}'
    path = write_raw(tmp_path / "model.safetensors", f'{{"w": {entry}, "w": {entry}}}'.encode(), b"\0" * 4)
    with pytest.raises(CheckpointError) as exc_info:
        read_header(path)
    assert_error(exc_info, path, "duplicate key 'w'")


# ---- folder errors -------------------------------------------------------------------------


def test_missing_folder(tmp_path: Path):
    with pytest.raises(CheckpointError) as exc_info:
        Checkpoint.open(tmp_path / "nope")
    assert_error(exc_info, tmp_path / "nope", "checkpoint folder not found")


def test_path_is_a_file(single: Path):
    path = single / "model.safetensors"
    with pytest.raises(CheckpointError) as exc_info:
        Checkpoint.open(path)
    assert_error(exc_info, path, "expected a checkpoint folder, found a file", "pass the folder that holds it")


def test_no_weights(tmp_path: Path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError) as exc_info:
        Checkpoint.open(tmp_path)
    assert_error(
        exc_info,
        tmp_path,
        "no weights found (looked for model.safetensors, model.safetensors.index.json, *.safetensors, "
        "pytorch_model.bin and pytorch_model.bin.index.json)",
    )


def test_other_bin_file_is_not_weights(tmp_path: Path):
    (tmp_path / "training_args.bin").write_bytes(b"\0" * 16)
    with pytest.raises(CheckpointError) as exc_info:
        Checkpoint.open(tmp_path)
    assert_error(exc_info, tmp_path, "no weights found", "found training_args.bin, which is not a model's weights file")


def test_several_safetensors_without_index(tmp_path: Path):
    save_file({"a": torch.zeros(1)}, str(tmp_path / "a.safetensors"))
    save_file({"b": torch.zeros(1)}, str(tmp_path / "b.safetensors"))
    with pytest.raises(CheckpointError) as exc_info:
        Checkpoint.open(tmp_path)
    assert_error(exc_info, tmp_path, "found 2 .safetensors files (a.safetensors, b.safetensors)", "index.json")


def test_broken_config(single: Path):
    (single / "config.json").write_text('{"hidden_size": ')
    with pytest.raises(CheckpointError) as exc_info:
        Checkpoint.open(single)
    assert_error(exc_info, single / "config.json", "config.json is not valid JSON")


def test_broken_index(tmp_path: Path):
    folder = tmp_path / "sharded"
    make_sharded(folder, sample_tensors())
    index = folder / "model.safetensors.index.json"
    index.write_text("{weight_map")
    with pytest.raises(CheckpointError) as exc_info:
        Checkpoint.open(folder)
    assert_error(exc_info, index, "model.safetensors.index.json is not valid JSON")


def test_index_without_weight_map(tmp_path: Path):
    folder = tmp_path / "sharded"
    make_sharded(folder, sample_tensors())
    index = folder / "model.safetensors.index.json"
    index.write_text('{"metadata": {}}')
    with pytest.raises(CheckpointError) as exc_info:
        Checkpoint.open(folder)
    assert_error(exc_info, index, "expected an object with a weight_map object, found no weight_map")


def test_index_names_missing_shard(tmp_path: Path):
    folder = tmp_path / "sharded"
    weight_map = make_sharded(folder, sample_tensors())
    (folder / "model-00003-of-00003.safetensors").unlink()
    mapped = [n for n, s in weight_map.items() if s == "model-00003-of-00003.safetensors"]
    with pytest.raises(CheckpointError) as exc_info:
        Checkpoint.open(folder)
    assert_error(
        exc_info,
        folder / "model.safetensors.index.json",
        f"weight_map names shard 'model-00003-of-00003.safetensors' (for {len(mapped)} tensors",
        "but that file does not exist",
    )


def test_index_maps_tensor_to_wrong_shard(tmp_path: Path):
    folder = tmp_path / "sharded"
    weight_map = make_sharded(folder, sample_tensors())
    name = next(n for n, s in weight_map.items() if s == "model-00001-of-00003.safetensors")
    weight_map[name] = "model-00002-of-00003.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError) as exc_info:
        Checkpoint.open(folder)
    assert_error(
        exc_info,
        folder / "model-00002-of-00003.safetensors",
        "maps this tensor to model-00002-of-00003.safetensors, which does not contain it",
        "it is in model-00001-of-00003.safetensors",
        tensor=name,
    )


def test_index_maps_tensor_no_shard_has(tmp_path: Path):
    folder = tmp_path / "sharded"
    weight_map = make_sharded(folder, sample_tensors())
    weight_map["ghost"] = "model-00001-of-00003.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError) as exc_info:
        Checkpoint.open(folder)
    assert_error(exc_info, folder / "model-00001-of-00003.safetensors", "no shard has it", tensor="ghost")


def test_tensor_in_two_shards(tmp_path: Path):
    folder = tmp_path / "sharded"
    tensors = sample_tensors()
    weight_map = make_sharded(folder, tensors)
    name = next(n for n, s in weight_map.items() if s == "model-00003-of-00003.safetensors")
    shard1 = folder / "model-00001-of-00003.safetensors"
    extra = load_file(str(shard1))
    extra[name] = tensors[name]
    save_file(extra, str(shard1))
    with pytest.raises(CheckpointError) as exc_info:
        Checkpoint.open(folder)
    assert_error(
        exc_info,
        folder / "model-00003-of-00003.safetensors",
        "present in two shards: model-00001-of-00003.safetensors and model-00003-of-00003.safetensors",
        tensor=name,
    )
