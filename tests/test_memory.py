"""Peak memory is bounded by a few chunks, not by the number (or total size) of tensors."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file


def peak_rss_of_run(folder, n_tensors: int, threads: str) -> int:
    for k, name in enumerate(("a", "b")):
        (folder / name).mkdir(parents=True)
        save_file({f"layers.{i}.w": torch.full((256, 1024), float(k + i)) for i in range(n_tensors)},
                  str(folder / name / "model.safetensors"), metadata={"format": "pt"})
    (folder / "spec.ml").write_text('a = model("a")\nb = model("b")\noutput a + dare(b - a, p=0.5)\n')
    # VmHWM is the peak RSS of this process image; ru_maxrss would also count the parent's pages
    # that a forked child shares until it execs.
    script = ("import sys\nfrom mergelang.cli import main\n"
              "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
              "print(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])")
    out = subprocess.run([sys.executable, "-c", script, "run", str(folder / "spec.ml"), "-o", str(folder / "out"),
                          "-q", "-j", threads], capture_output=True, text=True, check=True)
    assert (folder / "out" / "model.safetensors").exists(), out.stderr
    return int(out.stdout.split()[-1]) * 1024  # kB


@pytest.mark.parametrize("threads", ["1", "2"])  # one tensor at a time, and two side by side
def test_peak_memory_flat_in_number_of_tensors(tmp_path, threads):
    # 1 MB tensors: 80 MB of inputs against 800 MB. Holding even a tenth of what was read or written
    # would add 100 MB; the read-ahead and write-behind queues are bounded at 16 MB each.
    few = peak_rss_of_run(tmp_path / "few", 40, threads)
    many = peak_rss_of_run(tmp_path / "many", 400, threads)
    assert many - few < 64 << 20, f"peak RSS grew by {(many - few) / 2**20:.0f} MiB with 10x the tensors"
    assert few > 50 << 20  # the measurement is real: the interpreter and torch alone take more


def test_a_reduction_keeps_the_input_others_read_and_recomputes_the_one_below_it():
    """l1_ratio(x, keep_random(x)) as dare_linear uses it: the mask's result is kept whole (the output
    reads it), x is recomputed in the one pass; the values are those of an evaluation that keeps nothing."""
    from test_fusion import L, _data, same_bits

    from mergelang.check import TensorPlan
    from mergelang.execute import ExecOptions, TensorEvaluator
    from mergelang.graph import Node, const, with_random_key

    x = Node("sub", [L("a"), L("b")])
    y = with_random_key(Node("keep_random", [x, const(0.3), const(0)]))
    ratio = Node("l1_ratio", [x, y])
    graph = Node("mul", [y, ratio])
    shape = (64, 48)
    data = _data(shape)

    def evaluator(budget: int) -> TensorEvaluator:
        ev = TensorEvaluator(TensorPlan("w", graph, shape, "F32"), None, ExecOptions(seed=9, chunk=256))
        ev.read = lambda m, r0, r1, tensor=None: data[m][r0:r1].to(torch.float32)
        ev.budget = budget
        ev.full(ratio)
        return ev

    def values(ev: TensorEvaluator) -> torch.Tensor:
        return torch.cat([ev._as_tensor(ev.rows_of(graph, r0, r1), r1 - r0) for r0, r1 in ev.chunks()])

    kept, none = evaluator(1 << 30), evaluator(0)
    assert y in kept.cache and x not in kept.cache
    assert y not in none.cache  # the reference keeps nothing whole: every pass recomputes from the loads
    assert same_bits(values(kept), values(none)) and values(kept).count_nonzero() > 0
