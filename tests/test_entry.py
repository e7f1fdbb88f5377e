"""The console script leaves through os._exit (cli._leave): exit codes, output and files must be what a
normal interpreter shutdown gives."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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


@pytest.mark.skipif(shutil.which("strace") is None or not sys.platform.startswith("linux"),
                    reason="counts the process's mappings with strace")
def test_imports_run_in_one_frame_stack_chunk(tmp_path: Path):
    """launch._roomy: the command's frames fit one chunk of the interpreter's frame stack, so its
    imports do not map and unmap a chunk of 16 KB at every call on a chunk's edge."""
    trace = tmp_path / "trace"

    def chunks(*python: str) -> int:
        subprocess.run(["strace", "-f", "-e", "trace=mmap", "-e", "signal=none", "-o", str(trace), sys.executable,
                        *python], cwd=tmp_path, capture_output=True, check=True, timeout=300)
        return trace.read_text().count("mmap(NULL, 16384, PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS")

    assert chunks("-m", "mergelang", "--version") <= 5  # without its room: 1,000 to 14,000 here
