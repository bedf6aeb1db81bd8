"""The demo corpus per Python version: the splits of every CPython found on this machine equal the
table in tests/data/demo_corpus.json, which docs/pipeline.md shows.

The corpus is the running interpreter's standard library, so each version reads other files; the
split rule (sha256 of relative paths) makes the splits identical for a given version on every
machine. Interpreters are found without installing anything: this one, Debian's /usr/bin/python3,
pythonX.Y on PATH and pyenv's versions. nexus.demo_data is loaded from its file, so an interpreter
without torch serves.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TABLE = json.loads((ROOT / "tests" / "data" / "demo_corpus.json").read_text())
SPLITS = ("general_train", "general_eval", "domain_train", "domain_eval")
PROBE = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("demo_data", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
d = module.describe_corpus()
print(json.dumps({"python": d["python_version"], "splits": d["splits"]}))
"""


def interpreters() -> list[str]:
    found = [sys.executable, "/usr/bin/python3"]
    found += [shutil.which(f"python3.{minor}") or "" for minor in range(10, 15)]
    pyenv = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    found += sorted(glob.glob(os.path.join(pyenv, "versions", "3.*", "bin", "python3")))
    return [p for p in dict.fromkeys(found) if p and os.access(p, os.X_OK)]


def corpora() -> dict[str, dict]:
    """{python version: splits} of every interpreter >= 3.10 found."""
    out = {}
    for exe in interpreters():
        r = subprocess.run([exe, "-c", PROBE, str(ROOT / "src" / "nexus" / "demo_data.py")], capture_output=True,
                           text=True, timeout=300)
        if r.returncode == 0:
            d = json.loads(r.stdout)
            if tuple(map(int, d["python"].split(".")[:2])) >= (3, 10):
                out[d["python"]] = d["splits"]
    return out


@pytest.fixture(scope="module")
def found():
    return corpora()


def test_each_python_found_splits_the_corpus_as_the_table_says(found):
    known = {v: s for v, s in found.items() if v in TABLE}
    assert known, f"none of the Pythons found ({sorted(found)}) is in tests/data/demo_corpus.json"
    for version, splits in known.items():
        assert splits == TABLE[version], version
    if len(known) < 2:
        pytest.skip(f"only {sorted(known)} of the table's versions is on this machine")


def test_the_table_is_the_one_in_the_docs():
    doc = (ROOT / "docs" / "pipeline.md").read_text()
    for version, s in TABLE.items():
        row = f"| {version} | " + " | ".join(f"{s[k]['files']} / {s[k]['bytes'] / 1000:,.1f}" for k in SPLITS) + " |"
        assert row in doc, row
