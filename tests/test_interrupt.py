"""A real Ctrl-C (SIGINT) in the middle of `mergelang run`: exit 130, a message, nothing left behind."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import save_file


def test_sigint_midway(tmp_path):
    gen = torch.Generator().manual_seed(0)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        tensors = {f"w{i}": torch.randn(2048, 2048, generator=gen) for i in range(6)}
        save_file(tensors, str(tmp_path / name / "model.safetensors"), metadata={"format": "pt"})
    spec = tmp_path / "spec.ml"
    spec.write_text('a = model("a")\nb = model("b")\noutput a + dare(b - a, p=0.5)\n')
    out = tmp_path / "merged"
    # Ctrl-C as in a terminal: a shell without job control starts background commands with SIGINT
    # ignored, which a child inherits (and Python then installs no handler), so the run would finish.
    proc = subprocess.Popen([sys.executable, "-m", "mergelang", "run", str(spec), "-o", str(out), "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any("mergelang-tmp" in p.name for p in tmp_path.iterdir()):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "nothing was written" in stderr
    assert "Traceback" not in stderr
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "spec.ml"]
