"""The built wheel is self-contained: the grammar and the stdlib ship inside it.

The wheel is installed into a fresh virtual environment that sees this environment's dependencies
(torch, lark, ...) but not the source checkout, and is run from a folder outside the checkout.
"""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"{proc.args} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "PIP_"))}
    env["PYTHONNOUSERSITE"] = "1"
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheelhouse")
    check(
        run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(REPO)],
            cwd=out,
            env=clean_env(),
        )
    )
    (built,) = out.glob("mergelang-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("venv") / "env"
    env = clean_env()
    check(run([sys.executable, "-m", "venv", str(root)], cwd=root.parent, env=env))
    python = root / "bin" / "python"
    check(run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], cwd=root.parent, env=env))

    # Plain paths in a .pth file are added to sys.path without processing the .pth files inside them,
    # so the editable install of the checkout in this environment stays invisible to the new one.
    purelib = check(
        run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=root.parent, env=env)
    ).stdout.strip()
    (Path(purelib) / "host_site_packages.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return root


def test_wheel_contains_grammar_and_stdlib(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "mergelang/_data/grammar/mergelang.lark" in names
    assert any(n.startswith("mergelang/_data/stdlib/") and n.endswith(".ml") for n in names)
    assert "mergelang/resources.py" in names
    assert not any(n.startswith(("tests/", "grammar/", "stdlib/")) for n in names)


def test_installed_wheel_finds_its_data(venv, tmp_path):
    script = (
        "import json, mergelang, mergelang.resources as r\n"
        "print(json.dumps({'module': mergelang.__file__, 'grammar': str(r.grammar_path()),"
        " 'stdlib': [str(p) for p in r.stdlib_files()]}))\n"
    )
    found = json.loads(check(run([str(venv / "bin" / "python"), "-c", script], cwd=tmp_path, env=clean_env())).stdout)
    root = venv.resolve()
    assert Path(found["module"]).resolve().is_relative_to(root)
    grammar = Path(found["grammar"]).resolve()
    assert grammar.is_relative_to(root) and grammar.is_file()
    assert found["stdlib"]
    assert all(Path(p).resolve().is_relative_to(root) for p in found["stdlib"])
    assert not any(Path(p).resolve().is_relative_to(REPO) for p in [found["module"], *found["stdlib"]])


def test_installed_demo_command(venv, tmp_path):
    out = tmp_path / "demo-out"
    proc = run([str(venv / "bin" / "mergelang"), "demo", str(out)], cwd=tmp_path, env=clean_env())
    check(proc)
    assert (out / "merged" / "model.safetensors").is_file()
    assert (out / "merged" / "config.json").is_file()
