"""The demo corpus: the running interpreter's own standard library, split four ways.

    from nexus import demo_data
    texts = demo_data.stdlib_texts("general_train")        # list[str], one per source file
    demo_data.write_split("domain_eval", "domain_eval.jsonl")  # JSONL, one {"text": ...} per file
    demo_data.describe_corpus()                            # python version, files and bytes per split

Every CPython install carries its standard library as `.py` source, so the demo needs no download
and no text written by this project. Files are read from the interpreter's own stdlib path at run
time and are never copied into the repository.

Only modules present in *every* CPython install are used: Debian and Ubuntu move the test suites,
tkinter/turtle/idle, lib2to3, distutils and ensurepip/venv into separate packages, so those are
skipped everywhere (a corpus that changes with the distribution would make the demo irreproducible).
Machine-generated tables (codec tables in `encodings`, the `pydoc_data` topic dump, the build's
`_sysconfigdata_*`) are skipped because they teach a language model nothing about Python.

Splits come from a stable rule. The held-out domain is the files under `DOMAIN_PACKAGES`; the
general part is everything else. Within each group (each domain package on its own, so every one
of them is evaluated, and the general part as one group) files are ordered by the sha256 of their
relative path (not Python's salted `hash`), and the first ones in that order, until they hold at
least the eval fraction of the group's bytes, are held out for evaluation. Counting bytes rather
than files keeps the eval parts large enough on every Python version.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import sysconfig
from functools import lru_cache
from pathlib import Path

# The bundled demo model (pretrained on `general_train` by scripts/pretrain_demo.py).
DEMO_MODEL_DIR = Path(__file__).resolve().parent / "assets" / "demo-model"

SPLITS = ("general_train", "general_eval", "domain_train", "domain_eval")

# The held-out domain: the internet message formats and HTTP. One coherent area (http.client parses
# its headers with email.parser; both follow RFC 5322 headers, MIME, charsets), present in every
# CPython 3, ~0.6 MB, and unlike the rest of the library: in a pilot model pretrained without them,
# held-out email and http files scored +0.21 and +0.61 nats/token worse than held-out general files,
# whereas asyncio (the other candidate) scored 0.13 better, leaving nothing to specialize on.
DOMAIN_PACKAGES = ("email", "http")

# Fraction of each area's bytes held out for evaluation. The domain's is larger so that its eval
# part (~0.6 MB x 0.15) stays well above 50 KB while its train part stays >= 300 KB.
GENERAL_EVAL_FRACTION = 0.06
DOMAIN_EVAL_FRACTION = 0.15

# Top-level names not guaranteed in every CPython install (distributions package them separately,
# or newer versions removed them), or machine-generated data rather than code.
_EXCLUDED_TOP = frozenset({
    "site-packages", "dist-packages", "lib-dynload", "__pycache__",
    "test", "idlelib", "tkinter", "turtle.py", "turtledemo", "lib2to3", "distutils",
    "ensurepip", "venv",
    "encodings", "pydoc_data",
})
# Directory names that hold test suites anywhere in the tree (e.g. unittest/test, ctypes/test).
_EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "__pycache__", "site-packages"})


def stdlib_root() -> Path:
    """The running interpreter's standard-library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def _excluded(rel: str) -> bool:
    parts = rel.split("/")
    if parts[0] in _EXCLUDED_TOP or parts[0].startswith(("config-", "_sysconfigdata")):
        return True
    return any(p in _EXCLUDED_DIRS for p in parts[:-1])


def path_key(rel: str) -> bytes:
    """The stable sort key of a relative path (sha256: identical on every machine and run)."""
    return hashlib.sha256(rel.encode("utf-8")).digest()


def area_of(rel: str) -> str:
    """"domain" for files under `DOMAIN_PACKAGES`, "general" for the rest."""
    return "domain" if rel.split("/")[0] in DOMAIN_PACKAGES else "general"


def _group_of(rel: str) -> str:
    top = rel.split("/")[0]
    return top if top in DOMAIN_PACKAGES else "general"


@lru_cache(maxsize=4)
def _split_map(root: str) -> dict[str, str]:
    """{relative path: split} for every corpus file under `root`, in sorted path order."""
    base = Path(root)
    files = []
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = sorted(d for d in dirnames if d not in _EXCLUDED_DIRS)
        for name in filenames:
            if name.endswith(".py"):
                rel = (Path(dirpath) / name).relative_to(base).as_posix()
                if not _excluded(rel):
                    files.append(rel)
    out = {}
    for group in ("general", *DOMAIN_PACKAGES):
        area = "general" if group == "general" else "domain"
        fraction = GENERAL_EVAL_FRACTION if area == "general" else DOMAIN_EVAL_FRACTION
        members = sorted((f for f in files if _group_of(f) == group), key=lambda f: (path_key(f), f))
        sizes = {f: (base / f).stat().st_size for f in members}
        target, held = fraction * sum(sizes.values()), 0
        for f in members:
            if held < target:
                out[f], held = f"{area}_eval", held + sizes[f]
            else:
                out[f] = f"{area}_train"
    return dict(sorted(out.items()))


def stdlib_files(split: str | None = None, root: str | os.PathLike | None = None) -> list[str]:
    """Sorted relative paths of the corpus files, all of them or those of one split."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    splits = _split_map(str(Path(root or stdlib_root()).resolve()))
    return [f for f, s in splits.items() if split is None or s == split]


def _read(path: Path) -> str | None:
    # Stdlib source outside the skipped test suites is UTF-8; a file that is not, or is empty,
    # is left out rather than failing the demo.
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None
    return text if text.strip() else None


def stdlib_texts(split: str, root: str | os.PathLike | None = None) -> list[str]:
    """The source text of every file of `split`, in sorted path order."""
    base = Path(root or stdlib_root())
    texts = (_read(base / rel) for rel in stdlib_files(split, base))
    return [t for t in texts if t is not None]


def write_split(split: str, path: str | os.PathLike, root: str | os.PathLike | None = None) -> int:
    """Write `split` as JSONL (`{"text": ..., "path": ...}` per file), atomically; returns the file count."""
    from .fsutil import atomic_path

    base = Path(root or stdlib_root())
    n = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for rel in stdlib_files(split, base):
            text = _read(base / rel)
            if text is not None:
                f.write(json.dumps({"text": text, "path": rel}) + "\n")
                n += 1
    return n


def describe_corpus(root: str | os.PathLike | None = None) -> dict:
    """Python version, stdlib path and file/byte counts per split, for a model card."""
    base = Path(root or stdlib_root())
    splits = {}
    for split in SPLITS:
        texts = stdlib_texts(split, base)
        splits[split] = {"files": len(texts), "bytes": sum(len(t.encode("utf-8")) for t in texts)}
    return {
        "python_version": platform.python_version(),
        "implementation": sys.implementation.name,
        "stdlib_path": str(base),
        "domain_packages": list(DOMAIN_PACKAGES),
        "general_eval_fraction": GENERAL_EVAL_FRACTION,
        "domain_eval_fraction": DOMAIN_EVAL_FRACTION,
        "excluded": sorted(_EXCLUDED_TOP | _EXCLUDED_DIRS),
        "splits": splits,
    }
