"""The README's two commands from a fresh clone: `make demo` and `make test` make their own virtual
environment (.venv) and leave the Python they were run with untouched.

Slow (an install of torch, transformers and the rest, then the demo): `make test-slow` or
`pytest -m slow tests/test_setup.py`. It uses a Python other than the one running the tests where
one is available (Debian's /usr/bin/python3, which refuses a global `pip install`), else this one.
The clone is of the committed HEAD.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def other_python() -> str:
    """A Python >= 3.10 with the venv module other than this one, else this one."""
    for candidate in ("/usr/bin/python3", shutil.which("python3") or ""):
        if not candidate or not Path(candidate).exists():
            continue
        probe = subprocess.run([candidate, "-c", "import sys, venv, ensurepip; print(sys.prefix, sys.version_info >= (3, 10))"],
                               capture_output=True, text=True)
        prefix, _, ok = probe.stdout.strip().rpartition(" ")
        if probe.returncode == 0 and ok == "True" and Path(prefix).resolve() != Path(sys.prefix).resolve():
            return candidate
    return sys.executable


def clean_env() -> dict:
    """The environment of a user's shell: no virtual environment active, nothing on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    venv_bin = os.environ.get("VIRTUAL_ENV")
    if venv_bin:
        env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if not p.startswith(venv_bin))
    return dict(env, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")


@pytest.mark.slow
def test_readme_commands_in_a_fresh_clone_and_its_own_venv(tmp_path):
    if shutil.which("make") is None or shutil.which("git") is None:
        pytest.skip("needs make and git")
    python = other_python()
    clone = tmp_path / "clone"
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    subprocess.run(["git", "-C", str(clone), "checkout", "-q", head], check=True)
    before = subprocess.run([python, "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True).stdout

    demo = subprocess.run(["make", "demo", f"PYTHON={python}"], cwd=clone, env=clean_env(), capture_output=True,
                          text=True, timeout=3600)
    assert demo.returncode == 0, (demo.stdout + demo.stderr)[-4000:]
    assert "made the virtual environment .venv" in demo.stdout
    assert (clone / "demo_out" / "REPORT.md").is_file()
    version = lambda exe: subprocess.run([exe, "-c", "import sys; print(sys.version)"],  # noqa: E731
                                         capture_output=True, text=True).stdout
    assert version(str(clone / ".venv" / "bin" / "python")) == version(python)

    test = subprocess.run(["make", "test", f"PYTHON={python}", "PYTEST_ARGS=tests/test_cli.py tests/test_pipeline.py"],
                          cwd=clone, env=clean_env(), capture_output=True, text=True, timeout=3600)
    assert test.returncode == 0, (test.stdout + test.stderr)[-4000:]
    assert "made the virtual environment" not in test.stdout and "installing" not in test.stdout  # reused
    assert " passed" in test.stdout

    after = subprocess.run([python, "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True).stdout
    assert after == before  # nothing was installed into the Python make was run with
    assert subprocess.run(["git", "-C", str(clone), "status", "--porcelain"], capture_output=True,
                          text=True).stdout.strip() == ""  # .venv and demo_out are ignored
