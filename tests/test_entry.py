"""The console script leaves through os._exit (cli._leave): exit codes, output and files must be what a
normal interpreter shutdown gives."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from mergelang import __version__


def _mergelang(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mergelang", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_success_flushes_output_and_files(tmp_path: Path):
    proc = _mergelang("demo", str(tmp_path / "demo"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    # stdout is a pipe here (block-buffered): its whole text arrives, up to the last line
    assert proc.stdout.rstrip().endswith(f"mergelang verify {tmp_path / 'demo' / 'merged'}")
    merged = tmp_path / "demo" / "merged"
    assert json.loads((merged / "config.json").read_text())["model_type"] == "llama"
    verify = _mergelang("verify", str(merged), cwd=tmp_path)
    assert (verify.returncode, verify.stdout.strip()) == (0, "identical"), verify.stderr


def test_user_error_keeps_its_exit_code_and_message(tmp_path: Path):
    spec = tmp_path / "bad.ml"
    spec.write_text('a = model("x")\noutput a +\n')
    proc = _mergelang("check", str(spec), cwd=tmp_path)
    assert proc.returncode == 1
    assert f"{spec}:2:11" in proc.stderr and "1 error; nothing was written." in proc.stderr
    assert "Traceback" not in proc.stderr


def test_usage_error_and_version(tmp_path: Path):
    usage = _mergelang("run", cwd=tmp_path)
    assert usage.returncode == 2 and "Missing argument 'SPEC'" in usage.stderr
    version = _mergelang("--version", cwd=tmp_path)
    assert (version.returncode, version.stdout.strip()) == (0, f"mergelang, version {__version__}")
