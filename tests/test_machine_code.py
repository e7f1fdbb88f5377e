"""Stored machine code of the loops (ops/machine_code.py): an entry linked from its object computes
what numba's dispatcher computes, a run that finds its loops stored does not import numba, and a
stored object that cannot serve is compiled again (or the dispatcher runs)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numba
import numpy as np
import pytest
import torch

from conftest import digests, write_spec
from mergelang.ops import machine_code

ROOT = Path(machine_code.__file__).parents[2]


@numba.njit(nogil=True)
def mix(a16, a32, a64u, a64, af, grid, s32, s64u, s64, sf):
    """Every argument type: writes into af, grid and a64, returns an int64."""
    total = np.int64(0)
    for j in range(a16.shape[0]):
        af[j] = np.float32(a16[j]) * sf + np.float32(a32[j] >> s32)
        a64[j] += np.int64(a64u[j] % s64u) - s64
        total += a64[j]
    for r in range(grid.shape[0]):
        for c in range(grid.shape[1]):
            grid[r, c] = r * 10 + c + total
    return total


@numba.njit(nogil=True)
def has_nan(af):
    for j in range(af.shape[0]):
        if af[j] != af[j]:
            return True
    return False


@numba.njit(nogil=True)
def first_above(a32, t):
    """(index, count) as native_loops.nth_equal returns them: -1 where none is above t."""
    count = 0
    for j in range(a32.shape[0]):
        if a32[j] > t:
            count += 1
            if count == 1:
                return j, count
    return -1, count


@numba.njit(nogil=True)
def scratch(a32, out):
    """Allocates (numba's runtime, linked from its helper library)."""
    tmp = np.empty(a32.shape[0], np.uint32)
    for j in range(a32.shape[0]):
        tmp[j] = a32[j] * np.uint32(3)
    for j in range(a32.shape[0]):
        out[j] = tmp[a32.shape[0] - 1 - j]


MIX = ("u16[]", "u32[]", "u64[]", "i64[]", "f32[]", "i64[,]", "u32", "u64", "i64", "f32")


def mix_args():
    rng = np.random.default_rng(0)
    n = 1000
    return [rng.integers(0, 1 << 16, n, dtype=np.uint16), rng.integers(0, 1 << 32, n, dtype=np.uint32),
            rng.integers(0, 1 << 63, n, dtype=np.uint64), rng.integers(-50, 50, n, dtype=np.int64),
            np.zeros(n, np.float32), np.zeros((3, 7), np.int64),
            np.uint32(5), np.uint64(97), -3, np.float32(0.375)]


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Each test stores its objects in a folder of its own (the temporary folder's fallback too)."""
    monkeypatch.setenv("MERGELANG_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(machine_code, "_folders", lambda: [tmp_path / "cache" / "loops", tmp_path / "tmp"])


def counted(function):
    """A dispatcher factory that counts its calls (a compile, or the fallback)."""
    calls = []

    def factory():
        calls.append(1)
        return function
    return factory, calls


def test_an_entry_computes_what_its_dispatcher_computes_for_every_type():
    factory, calls = counted(mix)
    entry = machine_code.entry("test mix", MIX, "i64", factory)
    assert isinstance(entry, machine_code.Entry) and calls == [1]
    want, got = mix_args(), mix_args()
    assert entry(*got) == mix(*want)
    for g, w in zip(got, want):
        assert np.array_equal(np.asarray(g), np.asarray(w))
    f = np.zeros(100, np.float32)
    flag = machine_code.entry("test has_nan", ("f32[]",), "bool", lambda: has_nan)
    assert flag(f) is False
    f[77] = np.nan
    assert flag(f) is True
    pair = machine_code.entry("test first_above", ("u32[]", "u32"), "i64,i64", lambda: first_above)
    a = np.array([1, 2, 9, 3, 11], np.uint32)
    assert pair(a, np.uint32(5)) == first_above(a, np.uint32(5)) == (2, 1)
    assert pair(a, np.uint32(50)) == (-1, 0)


def test_a_stored_object_is_linked_without_compiling(tmp_path):
    factory, calls = counted(scratch)
    first = machine_code.entry("test scratch", ("u32[]", "u32[]"), None, factory)
    (stored,) = (tmp_path / "cache" / "loops").glob("*.o")
    again = machine_code.entry("test scratch", ("u32[]", "u32[]"), None, factory)
    assert calls == [1] and isinstance(again, machine_code.Entry) and again is not first
    header = json.loads(stored.read_bytes().split(b"\n", 1)[0])
    assert "NRT_MemInfo_alloc_aligned" in header["needs"]  # the allocation links numba's runtime
    a, out = np.arange(10, dtype=np.uint32), np.zeros(10, np.uint32)
    again(a, out)
    assert out.tolist() == [3 * v for v in range(9, -1, -1)]


def test_a_changed_or_unreadable_object_is_compiled_again(tmp_path):
    factory, calls = counted(has_nan)
    machine_code.entry("test has_nan", ("f32[]",), "bool", factory)
    (stored,) = (tmp_path / "cache" / "loops").glob("*.o")
    data = bytearray(stored.read_bytes())
    data[-100] ^= 0xFF  # a flipped byte in the code: its checksum no longer holds
    stored.write_bytes(bytes(data))
    entry = machine_code.entry("test has_nan", ("f32[]",), "bool", factory)
    assert calls == [1, 1] and entry(np.array([np.nan], np.float32)) is True
    head, _, code = stored.read_bytes().partition(b"\n")
    assert json.loads(head)["sha256"] == hashlib.sha256(code).hexdigest()  # stored anew
    stored.write_bytes(b"not json\n")
    assert machine_code.entry("test has_nan", ("f32[]",), "bool", factory)(np.zeros(3, np.float32)) is False
    assert calls == [1, 1, 1]


def test_a_symbol_not_found_compiles_again_and_else_the_dispatcher_runs(monkeypatch):
    factory, calls = counted(scratch)
    machine_code.entry("test scratch", ("u32[]", "u32[]"), None, factory)
    address = machine_code._address
    monkeypatch.setattr(machine_code, "_address",
                        lambda name: None if name == "NRT_MemInfo_alloc_aligned" else address(name))
    fallback = machine_code.entry("test scratch", ("u32[]", "u32[]"), None, factory)
    # compiled again, not linkable: the dispatcher, called as an entry is (torch tensors too)
    assert isinstance(fallback, machine_code.Dispatched) and fallback.function is scratch and calls == [1, 1, 1]
    out = np.zeros(4, np.uint32)
    fallback(np.arange(4, dtype=np.uint32), out)
    assert out.tolist() == [9, 6, 3, 0]
    tensor = torch.zeros(2, 2, dtype=torch.int32)
    fallback(torch.arange(4, dtype=torch.int32), tensor)
    assert tensor.flatten().tolist() == [9, 6, 3, 0]


def test_where_no_folder_can_be_written_the_loop_is_linked_all_the_same(tmp_path, monkeypatch):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    monkeypatch.setattr(machine_code, "_folders", lambda: [blocked / "loops", blocked / "tmp"])
    entry = machine_code.entry("test has_nan", ("f32[]",), "bool", lambda: has_nan)
    assert isinstance(entry, machine_code.Entry) and entry(np.ones(5, np.float32)) is False
    assert blocked.read_text() == "not a folder"


def test_an_entry_refuses_arguments_of_other_types():
    """An array goes by its bits (a float32 array is a u32[] one, of any shape where the type is
    1-D), so its element size must be the type's, and it must be contiguous."""
    entry = machine_code.entry("test scratch", ("u32[]", "u32[]"), None, lambda: scratch)
    a = np.arange(8, dtype=np.uint32)
    with pytest.raises(TypeError, match="contiguous u32"):
        entry(a, np.zeros(8, np.int64))
    with pytest.raises(TypeError, match="contiguous u32"):
        entry(a, np.zeros(8, np.uint16))
    with pytest.raises(TypeError, match="contiguous u32"):
        entry(a, np.zeros(16, np.uint32)[::2])
    with pytest.raises(TypeError, match="contiguous u32"):
        entry(a, np.zeros((4, 4), np.float32)[:, :2])
    out = np.zeros((2, 4), np.float32)  # by its bits, flattened
    entry(a, out)
    assert out.view(np.uint32).reshape(-1).tolist() == [21, 18, 15, 12, 9, 6, 3, 0]
    with pytest.raises(TypeError, match="2 arguments called with 1"):
        entry(a)


def test_an_entry_takes_torch_tensors_by_their_bits():
    """A tensor of the argument's element size goes by its data pointer: a bf16 tensor is a u16
    array, an int32 one a u32 array (any shape, where the type is 1-D); the same values as numpy's."""
    entry = machine_code.entry("test mix", MIX, "i64", lambda: mix)
    want = mix_args()
    expect = mix(*want)
    got = mix_args()
    tensors = [torch.from_numpy(got[0].view(np.int16)).view(torch.bfloat16).reshape(25, 40),
               torch.from_numpy(got[1].view(np.int32)), torch.from_numpy(got[2].view(np.int64)),
               torch.from_numpy(got[3]), torch.from_numpy(got[4]).view(10, 100), torch.from_numpy(got[5])]
    assert entry(*tensors, *got[6:]) == expect
    for g, w in zip(got, want):
        assert np.array_equal(np.asarray(g), np.asarray(w))
    with pytest.raises(TypeError, match="contiguous f32"):
        entry(*tensors[:4], torch.zeros(1000, dtype=torch.float64), *tensors[5:], *got[6:])
    with pytest.raises(TypeError, match="contiguous f32"):
        entry(*tensors[:4], torch.zeros(2000)[::2], *tensors[5:], *got[6:])
    with pytest.raises(TypeError, match=r"contiguous i64\[,\]"):
        entry(*tensors[:5], torch.zeros(21, dtype=torch.int64), *got[6:])


def test_the_digest_follows_the_source_the_signature_and_numba_settings(monkeypatch):
    base = machine_code.digest("x", ("u32[]",), None)
    assert base == machine_code.digest("x", ("u32[]",), None)
    assert len({base, machine_code.digest("y", ("u32[]",), None), machine_code.digest("x", ("u16[]",), None),
                machine_code.digest("x", ("u32[]",), "i64")}) == 4
    monkeypatch.setattr(machine_code, "_state", {})  # numba's settings are read when the linker is set up
    monkeypatch.setenv("NUMBA_OPT", "1")
    assert machine_code.digest("x", ("u32[]",), None) != base


SPEC = """\
base = model("base")
ft0 = model("ft0")
ft1 = model("ft1")
output avg(ties(base, [ft0, ft1], weights=[0.6, 0.4], density=0.5),
           dare_linear(base, [ft0, ft1], weights=[0.5, 0.5], density=0.3))
"""

RUN = """\
import logging, sys
logging.basicConfig(level=logging.WARNING)
logging.getLogger("mergelang.ops.machine_code").setLevel(logging.DEBUG)  # why a loop is compiled
from mergelang.ops import native
native.MIN_ELEMENTS = 1  # the tiny family's chunks take the loops
if sys.argv[3] == "first":  # every loop compiled and stored: none left to a later run while another builds
    from mergelang.native_regions import NativeRegions
    build = NativeRegions._loop
    NativeRegions._loop = lambda self, steps, kinds, taps=(), out="f32", wait=False, build_it=True: build(
        self, steps, kinds, taps, out, True, build_it)
    for name in native.SIGNATURES:
        native._loop(name, wait=True)
from pathlib import Path
from mergelang.api import RunOptions, run
run(Path(sys.argv[1]), Path(sys.argv[2]), RunOptions(seed=5, chunk=300, compile="auto"))
print("numba imported" if "numba" in sys.modules else "numba not imported")
"""


def test_a_run_that_finds_its_loops_stored_does_not_import_numba(family, tmp_path):
    spec = write_spec(family, SPEC, "stored_loops.ml")
    env = {**os.environ, "MERGELANG_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
    said, logs, outs = [], [], {}
    for name, native in (("first", "1"), ("again", "1"), ("eager", "0")):
        done = subprocess.run([sys.executable, "-c", RUN, str(spec), str(tmp_path / name), name], capture_output=True,
                              text=True, timeout=600, env={**env, "MERGELANG_NATIVE": native})
        assert done.returncode == 0, done.stderr
        said.append(done.stdout.strip())
        logs.append(done.stderr)
        outs[name] = digests(tmp_path / name)
    assert said == ["numba imported", "numba not imported", "numba not imported"], logs
    assert outs["first"] == outs["again"] == outs["eager"]
    assert len(list((tmp_path / "cache" / "loops").glob("*.o"))) >= 4  # regions and native_loops' loops
