"""PyTorch `.bin` checkpoints: read through torch.load(weights_only=True), one shard at a time,
compared against the safetensors files they were converted from."""

from __future__ import annotations

import json
import shutil
import threading
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_spec
from mergelang.api import RunOptions, check, run
from mergelang.diagnostics import MergelangError
from mergelang.io import BinCheckpoint, Checkpoint, CheckpointError
from mergelang.io import torch_bin
from mergelang.io.torch_bin import BIN_FILE, BIN_INDEX_FILE


class NotATensor:
    """A class instance in a pickle: weights_only must refuse it."""


def weights_in_order(folder: Path) -> "OrderedDict[str, torch.Tensor]":
    """The safetensors weights of `folder`, in the file's data order."""
    order = list(Checkpoint.open(folder).tensors)
    loaded = {}
    for file in sorted(folder.glob("*.safetensors")):
        loaded.update(load_file(str(file)))
    return OrderedDict((name, loaded[name]) for name in order)


def to_bin(source: Path, target: Path, shards: int = 1, legacy: bool = False) -> Path:
    """Write `source`'s weights as pytorch_model.bin (or `shards` shards with an index) plus its config."""
    target.mkdir(parents=True)
    shutil.copy(source / "config.json", target / "config.json")
    weights = weights_in_order(source)
    kwargs = {"_use_new_zipfile_serialization": False} if legacy else {}
    if shards == 1:
        torch.save(weights, target / BIN_FILE, **kwargs)
        return target
    names = list(weights)
    size = -(-len(names) // shards)
    weight_map = {}
    for k in range(shards):
        file = f"pytorch_model-{k + 1:05d}-of-{shards:05d}.bin"
        part = OrderedDict((n, weights[n]) for n in names[k * size:(k + 1) * size])
        torch.save(part, target / file, **kwargs)
        weight_map.update({n: file for n in part})
    (target / BIN_INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return target


@pytest.fixture
def live_shards(monkeypatch):
    """Wraps torch.load as torch_bin.py reads it (through mergelang.lazy's torch, which keeps each
    attribute it has read): records its keyword arguments and how many loaded state dicts are alive."""
    real_load = torch.load
    state = {"live": 0, "peak": 0, "calls": []}
    lock = threading.Lock()

    class Tracked(OrderedDict):
        def __del__(self):
            with lock:
                state["live"] -= 1

    def load(path, **kwargs):
        loaded = real_load(path, **kwargs)
        state["calls"].append((Path(path).name, kwargs))
        with lock:
            state["live"] += 1
            state["peak"] = max(state["peak"], state["live"])
        return Tracked(loaded)

    monkeypatch.setattr(torch_bin.torch, "load", load)
    return state


def test_single_bin_matches_safetensors(family: Path, tmp_path: Path):
    folder = to_bin(family / "ft0", tmp_path / "ft0")
    expected = weights_in_order(family / "ft0")
    with Checkpoint.open(folder) as ckpt:
        assert isinstance(ckpt, BinCheckpoint)
        assert ckpt.files == [folder / BIN_FILE]
        assert ckpt.config == json.loads((family / "ft0" / "config.json").read_text())
        assert list(ckpt.tensors) == list(expected)
        for name, tensor in expected.items():
            info = ckpt.tensors[name]
            assert (info.shape, info.dtype, info.path) == (tuple(tensor.shape), "BF16", folder / BIN_FILE)
            got = ckpt.read(name)
            assert got.dtype == torch.bfloat16 and got.shape == (tensor.numel(),)
            assert torch.equal(got, tensor.reshape(-1))
            assert torch.equal(ckpt.read(name, 3, 11), tensor.reshape(-1)[3:11])
            # check's DARE sample: the float32 values, as numpy
            assert ckpt.read_floats(name, 3, 11).tobytes() == tensor.reshape(-1)[3:11].float().numpy().tobytes()


def test_sharded_reads_hold_two_mapped_shards(family: Path, tmp_path: Path, live_shards):
    folder = to_bin(family / "base", tmp_path / "base", shards=3)
    expected = weights_in_order(family / "base")
    ckpt = Checkpoint.open(folder)
    assert [f.name for f in ckpt.files] == [f"pytorch_model-0000{k}-of-00003.bin" for k in (1, 2, 3)]
    assert live_shards["peak"] == 1 and live_shards["live"] == 0  # the header pass dropped each shard
    # every load maps the file (zip format) through the restricted unpickler
    assert all(kw == {"map_location": "cpu", "weights_only": True, "mmap": True} for _, kw in live_shards["calls"])
    # alternate between shards from four threads, as the read-ahead and compute threads do
    names = list(expected)
    order = [n for pair in zip(names, reversed(names)) for n in pair]
    errors = []

    def reader(offset: int) -> None:
        try:
            for name in order[offset:] + order[:offset]:
                flat = expected[name].reshape(-1)
                assert torch.equal(ckpt.read(name, 1, flat.numel()), flat[1:])
        except BaseException as e:  # re-raised below
            errors.append(e)

    threads = [threading.Thread(target=reader, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert live_shards["peak"] == 2  # two mapped at once (workers on either side of a shard boundary)
    assert len(live_shards["calls"]) > 3 + 3  # shards were switched, so each was loaded again
    ckpt.close()
    assert live_shards["live"] == 0


def test_legacy_format_loads_without_mmap(family: Path, tmp_path: Path, live_shards):
    folder = to_bin(family / "ft1", tmp_path / "ft1", shards=2, legacy=True)
    expected = weights_in_order(family / "ft1")
    with Checkpoint.open(folder) as ckpt:
        for name, tensor in expected.items():
            assert torch.equal(ckpt.read(name), tensor.reshape(-1))
    assert {kw["mmap"] for _, kw in live_shards["calls"]} == {False}
    assert live_shards["peak"] == 1


def test_safetensors_preferred_when_both(family: Path, tmp_path: Path):
    folder = tmp_path / "both"
    shutil.copytree(family / "ft0", folder)
    torch.save({"only.in.the.bin": torch.zeros(2)}, folder / BIN_FILE)
    ckpt = Checkpoint.open(folder)
    assert type(ckpt) is Checkpoint
    assert list(ckpt.tensors) == list(weights_in_order(family / "ft0"))


def test_merge_bin_with_safetensors(family: Path, tmp_path: Path):
    to_bin(family / "ft0", tmp_path / "ft0", shards=2)
    shutil.copytree(family / "base", tmp_path / "base")
    spec = write_spec(tmp_path, 'base = model("base")\nft0 = model("ft0")\noutput base + 0.5 * (ft0 - base)\n')
    out = run(spec, tmp_path / "merged", RunOptions(dtype="fp32"))
    merged = load_file(str(out / "model.safetensors"))
    base, ft0 = weights_in_order(family / "base"), weights_in_order(family / "ft0")
    assert set(merged) == set(base)
    for name in base:
        expected = base[name].float() + 0.5 * (ft0[name].float() - base[name].float())
        assert merged[name].dtype == torch.float32
        assert torch.equal(merged[name], expected), name


def test_same_bytes_as_safetensors(family: Path, tmp_path: Path):
    text = ('base = model("base")\nft0 = model("ft0")\nft1 = model("ft1")\n'
            "output base + avg(dare(ft0 - base, p=0.5), dare(ft1 - base, p=0.3))\n")
    for name in ("base", "ft0", "ft1"):
        shutil.copytree(family / name, tmp_path / "st" / name)
    to_bin(family / "base", tmp_path / "bin" / "base")
    to_bin(family / "ft0", tmp_path / "bin" / "ft0", shards=3)
    to_bin(family / "ft1", tmp_path / "bin" / "ft1", shards=2, legacy=True)
    outputs = []
    for kind in ("st", "bin"):
        spec = write_spec(tmp_path / kind, text)
        outputs.append(run(spec, tmp_path / f"out-{kind}", RunOptions(seed=5, chunk=1000)))
    st, binary = (sorted(p.name for p in out.glob("*.safetensors")) for out in outputs)
    assert st == binary == ["model.safetensors"]
    assert (outputs[0] / "model.safetensors").read_bytes() == (outputs[1] / "model.safetensors").read_bytes()
    # and the bytes are not those of an input: the merge did something
    assert (outputs[0] / "model.safetensors").read_bytes() != (family / "base" / "model.safetensors").read_bytes()


def test_workers_read_shards_in_order_not_by_turns(family: Path, tmp_path: Path, live_shards):
    """Two workers over a 5-shard .bin model: the same bytes as one, and each shard loaded about
    once (tensors grouped by shard, two shards kept mapped), not once per chunk."""
    to_bin(family / "ft0", tmp_path / "ft0", shards=5)
    shutil.copytree(family / "base", tmp_path / "base")
    spec = write_spec(tmp_path, 'base = model("base")\nft0 = model("ft0")\noutput base + 0.5 * (ft0 - base)\n')
    threads = torch.get_num_threads()
    outputs = []
    try:
        for j in (1, 2):
            torch.set_num_threads(j)
            live_shards["calls"].clear()
            outputs.append(run(spec, tmp_path / f"j{j}", RunOptions(chunk=100)))
            loads = len(live_shards["calls"])
            assert loads <= 5 + 5 + 2, f"-j {j}: {loads} shard loads"  # the header pass, the merge, a boundary or two
    finally:
        torch.set_num_threads(threads)
    assert (outputs[0] / "model.safetensors").read_bytes() == (outputs[1] / "model.safetensors").read_bytes()


# ---- bad input: CheckpointErrors and diagnostics naming the model, the file and the tensor ----------


def plan_error(tmp_path: Path, folder: Path) -> str:
    """The rendered diagnostics of `mergelang check` on a spec whose model `ft` is `folder`."""
    spec = write_spec(tmp_path, f'ft = model("{folder}")\noutput ft * 2\n')
    with pytest.raises(MergelangError) as exc_info:
        check(spec, RunOptions())
    return "\n".join(d.render() for d in exc_info.value.diagnostics)


def test_forbidden_global_is_refused(tmp_path: Path):
    folder = tmp_path / "evil"
    folder.mkdir()
    torch.save({"w": torch.zeros(2, 2), "payload": NotATensor()}, folder / BIN_FILE)
    with pytest.raises(CheckpointError) as exc_info:
        Checkpoint.open(folder)
    assert exc_info.value.path == folder / BIN_FILE
    assert "torch.load(weights_only=True) refused this file: Unsupported global" in str(exc_info.value)
    assert "NotATensor" in str(exc_info.value)
    text = plan_error(tmp_path, folder)
    assert "error[E010]: model `ft`" in text and str(folder / BIN_FILE) in text and "weights_only" in text


def test_non_tensor_entry(tmp_path: Path):
    folder = tmp_path / "odd"
    folder.mkdir()
    torch.save({"w": torch.zeros(2), "step": 7}, folder / BIN_FILE)
    text = plan_error(tmp_path, folder)
    assert "model `ft`" in text and f"{folder / BIN_FILE}: tensor 'step': expected a tensor, found int 7" in text


def test_integer_tensor_is_a_dtype_error_naming_the_file(tmp_path: Path):
    folder = tmp_path / "ints"
    folder.mkdir()
    torch.save({"w": torch.arange(6).reshape(2, 3)}, folder / BIN_FILE)
    text = plan_error(tmp_path, folder)
    assert "error[E011]: cannot compute in I64: model `ft` stores `w` as I64" in text
    assert f"`w` is in {folder / BIN_FILE}" in text


def test_missing_shard(family: Path, tmp_path: Path):
    folder = to_bin(family / "ft0", tmp_path / "ft0", shards=3)
    (folder / "pytorch_model-00002-of-00003.bin").unlink()
    index = json.loads((folder / BIN_INDEX_FILE).read_text())["weight_map"]
    first = next(n for n, f in index.items() if f == "pytorch_model-00002-of-00003.bin")
    text = plan_error(tmp_path, folder)
    assert "model `ft`" in text and str(folder / BIN_INDEX_FILE) in text
    assert "weight_map names shard 'pytorch_model-00002-of-00003.bin'" in text and repr(first) in text
    assert "does not exist" in text


def test_corrupt_shard(family: Path, tmp_path: Path):
    folder = to_bin(family / "ft0", tmp_path / "ft0", shards=2)
    shard = folder / "pytorch_model-00002-of-00002.bin"
    shard.write_bytes(shard.read_bytes()[:300])
    index = json.loads((folder / BIN_INDEX_FILE).read_text())["weight_map"]
    first = next(n for n, f in index.items() if f == shard.name)
    text = plan_error(tmp_path, folder)
    assert "error[E010]: model `ft`" in text and str(shard) in text
    assert "not a readable PyTorch checkpoint (damaged or truncated?)" in text
    assert f"the index maps {list(index.values()).count(shard.name)} tensors to this file, e.g. {first!r}" in text


def test_index_disagrees_with_shard(family: Path, tmp_path: Path):
    folder = to_bin(family / "ft0", tmp_path / "ft0", shards=2)
    data = json.loads((folder / BIN_INDEX_FILE).read_text())
    name = next(n for n, f in data["weight_map"].items() if f.startswith("pytorch_model-00002"))
    data["weight_map"][name] = "pytorch_model-00001-of-00002.bin"
    (folder / BIN_INDEX_FILE).write_text(json.dumps(data))
    text = plan_error(tmp_path, folder)
    assert "model `ft`" in text and str(folder / "pytorch_model-00001-of-00002.bin") in text
    assert (f"tensor {name!r}: pytorch_model.bin.index.json maps this tensor to pytorch_model-00001-of-00002.bin, "
            "which does not contain it (it is in pytorch_model-00002-of-00002.bin)") in text


def test_tensor_in_two_shards(tmp_path: Path):
    folder = tmp_path / "dup"
    folder.mkdir()
    torch.save({"a": torch.zeros(2), "b": torch.ones(2)}, folder / "pytorch_model-00001-of-00002.bin")
    torch.save({"b": torch.ones(2)}, folder / "pytorch_model-00002-of-00002.bin")
    weight_map = {"a": "pytorch_model-00001-of-00002.bin", "b": "pytorch_model-00002-of-00002.bin"}
    (folder / BIN_INDEX_FILE).write_text(json.dumps({"weight_map": weight_map}))
    text = plan_error(tmp_path, folder)
    assert "model `ft`" in text
    assert (f"{folder / 'pytorch_model-00002-of-00002.bin'}: tensor 'b': present in two shards: "
            "pytorch_model-00001-of-00002.bin and pytorch_model-00002-of-00002.bin") in text


def test_shards_without_index(tmp_path: Path):
    folder = tmp_path / "noindex"
    folder.mkdir()
    for k in (1, 2):
        torch.save({f"t{k}": torch.zeros(1)}, folder / f"pytorch_model-0000{k}-of-00002.bin")
    with pytest.raises(CheckpointError) as exc_info:
        Checkpoint.open(folder)
    assert str(exc_info.value) == (
        f"{folder}: found 2 .bin shards (pytorch_model-00001-of-00002.bin, pytorch_model-00002-of-00002.bin) "
        "but no pytorch_model.bin.index.json saying which tensors each holds"
    )


def test_non_contiguous_and_shared_storage(tmp_path: Path):
    """Tensors saved as views (transposed, or slices of one storage) read as their own values."""
    x = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    folder = tmp_path / "views"
    folder.mkdir()
    torch.save({"t": x.t(), "row": x[2], "x": x}, folder / BIN_FILE)
    ckpt = Checkpoint.open(folder)
    assert {n: i.shape for n, i in ckpt.tensors.items()} == {"t": (6, 4), "row": (6,), "x": (4, 6)}
    assert ckpt.read("t", 0, 8).tolist() == [0.0, 6.0, 12.0, 18.0, 1.0, 7.0, 13.0, 19.0]
    assert ckpt.read("t", 20, 24).tolist() == [5.0, 11.0, 17.0, 23.0]
    assert ckpt.read("row").tolist() == [12.0, 13.0, 14.0, 15.0, 16.0, 17.0]
    assert torch.equal(ckpt.read("x"), torch.arange(24, dtype=torch.float32))
