"""The worker pool that evaluates tensors side by side: every item once, errors and cancellation."""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest
import torch

from mergelang.execute import ExecOptions, workers_for
from mergelang.fuse import Fuser
from mergelang.overlap import Cancelled, for_each_parallel


def test_every_item_once_on_several_threads():
    seen: list[int] = []
    names: set[str] = set()
    both_running = threading.Barrier(2, timeout=10)  # fails unless two workers run at the same time
    lock = threading.Lock()

    def work(item, check):
        if item < 2:
            both_running.wait()
        with lock:
            seen.append(item)
            names.add(threading.current_thread().name)

    for_each_parallel(range(50), work, workers=2)
    assert sorted(seen) == list(range(50))
    assert len(names) == 2


def test_first_error_is_raised_after_the_others_stop():
    cancelled = threading.Event()
    started = threading.Event()

    def work(item, check):
        if item == 0:  # a long item that polls check(), as the executor does between chunks
            started.set()
            deadline = time.monotonic() + 10
            try:
                while time.monotonic() < deadline:
                    check()
                    time.sleep(0.001)
            except Cancelled:
                cancelled.set()
                raise
            return
        started.wait(10)
        raise ValueError(f"item {item} failed")

    with pytest.raises(ValueError, match="item 1 failed"):
        for_each_parallel(range(5), work, workers=2)
    assert cancelled.is_set()  # the long item was cancelled, and had ended when the error came out


def test_one_worker_runs_in_order():
    seen: list[int] = []
    for_each_parallel(range(10), lambda item, check: seen.append(item), workers=1)
    assert seen == list(range(10))


def test_workers_follow_threads_device_and_compilation():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        assert workers_for(ExecOptions(), Fuser("never")) == 3
        assert workers_for(ExecOptions(device="cuda"), Fuser("never")) == 1
        assert workers_for(ExecOptions(), Fuser("always")) == 1  # compiled regions use every thread
        torch.set_num_threads(1)
        assert workers_for(ExecOptions(), Fuser("never")) == 1
    finally:
        torch.set_num_threads(threads)


def count_reads(monkeypatch) -> Counter:
    """Bytes read from each checkpoint (by its folder's name), counted from now on."""
    from mergelang.io import Checkpoint

    read = Checkpoint.read_array  # what the executor reads with (read() views it as a tensor)
    counted: Counter = Counter()

    def counting(self, name, start=0, stop=None):
        data = read(self, name, start, stop)
        counted[self.path.name] += data.nbytes
        return data

    monkeypatch.setattr(Checkpoint, "read_array", counting)
    return counted


def test_workers_read_an_input_that_several_regions_share_once(family, tmp_path, monkeypatch):
    """ties reads base for every fine-tune's delta and again for the output: side by side, each
    worker keeps it whole (as stored) and reads it once per tensor; the bytes stay those of -j 1."""
    from conftest import write_spec
    from mergelang.api import RunOptions, run
    from mergelang.io import Checkpoint

    spec = write_spec(tmp_path, f'base = model("{family / "base"}")\nft0 = model("{family / "ft0"}")\n'
                                f'ft1 = model("{family / "ft1"}")\n'
                                "output ties(base, [ft0, ft1], weights=[0.6, 0.4], density=0.5)\n")
    counted = count_reads(monkeypatch)
    threads = torch.get_num_threads()
    outputs, reads = [], []
    try:
        for j in (1, 2):
            torch.set_num_threads(j)
            counted.clear()
            outputs.append(run(spec, tmp_path / f"j{j}", RunOptions(chunk=512)))
            reads.append(dict(counted))
    finally:
        torch.set_num_threads(threads)
    size = sum(info.nbytes for info in Checkpoint.open(family / "base").tensors.values())
    assert reads[0]["base"] > 2 * size  # one tensor at a time: read for each region
    assert reads[1]["base"] == size  # side by side: once
    assert reads[1]["ft0"] == reads[1]["ft1"] == size
    assert (outputs[0] / "model.safetensors").read_bytes() == (outputs[1] / "model.safetensors").read_bytes()


def test_tapped_reductions_keep_their_loads_and_read_each_input_once(family, tmp_path, monkeypatch):
    """With native loops (here on the tiny family's tensors too), l1_ratio's and topk_cutoff's
    first passes run inside the loops of their inputs (tapped.py), all four in one, which are not
    kept whole: side by side, each worker keeps the loads instead, reading every input once per
    tensor; the bytes are those of -j 1 and of the eager path. (A density of 0.7 draws no warning,
    whose check would read samples of the inputs.)"""
    from conftest import write_spec
    from mergelang.api import RunOptions, run
    from mergelang import tapped as tapped_module
    from mergelang.io import Checkpoint
    from mergelang.native_regions import NativeRegions
    from mergelang.ops import OPS, native

    monkeypatch.setattr(native, "MIN_ELEMENTS", 1)
    monkeypatch.setenv("MERGELANG_CACHE_DIR", str(tmp_path / "cache"))
    # Loops ready for every chunk: all linked before the workers start, and a worker waits for
    # a loop another one is building instead of running that chunk eagerly (the run's default).
    assert all(native._loop(name, wait=True) is not None for name in native.SIGNATURES)
    building = threading.Lock()
    real_loop = NativeRegions._loop

    def one_build_at_a_time(self, *args):
        with building:
            return real_loop(self, *args)

    monkeypatch.setattr(NativeRegions, "_loop", one_build_at_a_time)
    joint_runs: list = []  # what each joint loop's call returned (a loop run for its taps only: True)
    real_rows_of = NativeRegions.rows_of

    def rows_of(self, *args, taps_only=False, **kwargs):
        ran = real_rows_of(self, *args, taps_only=taps_only, **kwargs)
        if taps_only:
            joint_runs.append(ran)
        return ran

    monkeypatch.setattr(NativeRegions, "rows_of", rows_of)
    spec = write_spec(tmp_path, f'base = model("{family / "base"}")\nft0 = model("{family / "ft0"}")\n'
                                f'ft1 = model("{family / "ft1"}")\n'
                                "output dare_linear(base, [ft0, ft1], weights=[0.6, 0.4], density=0.7) + "
                                "ties(base, [ft0, ft1], weights=[0.6, 0.4], density=0.5)\n")
    counted = count_reads(monkeypatch)
    tapped: dict = {}  # evaluator side by side with loops → its first passes' results
    real_first_passes = tapped_module.first_passes

    def first_passes(evaluator, members):
        done = real_first_passes(evaluator, members)
        if evaluator.keep_loads and evaluator.fuser.native is not None:  # side by side, with loops
            tapped.setdefault(evaluator, []).extend(done)
            groups.append(len(members))
        return done

    groups: list[int] = []
    monkeypatch.setattr(tapped_module, "first_passes", first_passes)
    joints: list[int] = []  # the taps of each loop over several roots
    real_joint = tapped_module._joint
    monkeypatch.setattr(tapped_module, "_joint", lambda ev, ms: joints.append(len(ms)) or real_joint(ev, ms))
    threads = torch.get_num_threads()
    outputs, reads = {}, {}
    try:
        for j, mode in ((2, "auto"), (1, "auto"), (2, "never")):
            torch.set_num_threads(j)
            counted.clear()
            outputs[j, mode] = (run(spec, tmp_path / f"j{j}{mode}", RunOptions(chunk=512, compile=mode))
                                / "model.safetensors").read_bytes()
            reads[j, mode] = dict(counted)
    finally:
        torch.set_num_threads(threads)
    # Every reduction tapped, all of a tensor's together (two l1 sums and two top-k selects); no
    # delta, no mask kept whole: the loads are.
    assert tapped and all(all(done) for done in tapped.values())
    assert set(groups) == {4} and joints and set(joints) == {4}
    assert joint_runs and set(joint_runs) == {True}  # the joint loops ran, storing no sum of the roots
    assert not [n for ev in tapped for n in ev.cache if OPS[n.op].kind == "elementwise"]
    size = sum(info.nbytes for info in Checkpoint.open(family / "base").tensors.values())
    assert reads[2, "auto"] == {"base": size, "ft0": size, "ft1": size}
    assert outputs[2, "auto"] == outputs[1, "auto"] == outputs[2, "never"]


def test_sums_take_their_first_chunk_in_the_joint_loop_too(family, tmp_path, monkeypatch):
    """dare_linear's two pairs of l1 sums need no first chunk of their own (a select's bracket does):
    side by side with loops, every chunk of their first pass, the first included, runs in the one
    loop over both deltas, and no member's own loop runs; the bytes are those of the eager path.
    ties' selects take their first chunk in the joint loop too, twice (to bin it, then to note it):
    no member's own loop runs either, and the bytes are the eager path's."""
    from conftest import write_spec
    from mergelang.api import RunOptions, run
    from mergelang.native_regions import NativeRegions
    from mergelang.ops import native

    monkeypatch.setattr(native, "MIN_ELEMENTS", 1)
    monkeypatch.setenv("MERGELANG_CACHE_DIR", str(tmp_path / "cache"))
    assert all(native._loop(name, wait=True) is not None for name in native.SIGNATURES)
    calls: list[tuple[bool, int]] = []  # (a joint loop, first row) of each tapped loop's chunk
    real_rows_of = NativeRegions.rows_of

    def rows_of(self, evaluator, steps, r0, r1, out=None, taps=(), wait=False, taps_only=False):
        if taps:
            calls.append((taps_only, r0))
        return real_rows_of(self, evaluator, steps, r0, r1, out, taps, wait, taps_only)

    monkeypatch.setattr(NativeRegions, "rows_of", rows_of)
    models = f'base = model("{family / "base"}")\nft0 = model("{family / "ft0"}")\nft1 = model("{family / "ft1"}")\n'
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        outputs, tapped_calls = {}, {}
        for method, extra in (("dare_linear", "density=0.7"), ("ties", "density=0.5")):
            spec = write_spec(tmp_path, models + f"output {method}(base, [ft0, ft1], weights=[0.6, 0.4], {extra})\n",
                              name=f"{method}.ml")
            calls.clear()
            outputs[method] = [(run(spec, tmp_path / f"{method}{mode}", RunOptions(chunk=512, compile=mode))
                                / "model.safetensors").read_bytes() for mode in ("auto", "never")]
            tapped_calls[method] = list(calls)
    finally:
        torch.set_num_threads(threads)
    sums, selects = tapped_calls["dare_linear"], tapped_calls["ties"]
    assert sums and all(joint for joint, _ in sums) and any(r0 == 0 for _, r0 in sums)
    assert selects and all(joint for joint, _ in selects)
    firsts = [r0 for _, r0 in selects].count(0)
    assert firsts and firsts % 2 == 0  # each tensor's first chunk: binned, then noted
    assert all(native == eager for native, eager in outputs.values())
