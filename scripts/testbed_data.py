"""The testbed corpus: four clearly different kinds of text every Debian-like machine carries.

    from testbed_data import build_corpus
    corpus = build_corpus()          # {"texts": {split: [(domain, path, text), ...]}, "manifest": {...}}

Domains (each read from the running machine, never copied into the repository):

- `python`: the standard library `.py` sources of the running interpreter (the demo's file rule,
  `nexus.demo_data.stdlib_files`: no test suites, no generated tables);
- `c`: C headers, `*.h` under /usr/include;
- `perl`: Perl modules, `*.pm` under /usr/share/perl, /usr/share/perl5 and the architecture's perl lib;
- `man` (the held-out domain): English manual pages, /usr/share/man/man1..man8, gzipped roff decompressed.

Selection and splits are one deterministic rule, the same on every machine with the same files:
each domain's candidate files (regular files, no symlinks, found by a sorted walk) are ordered by the
sha256 of `domain:path`; they are read in that order, each truncated to `FILE_CAP` bytes at a
line end, empty / non-UTF-8 / `.so` redirect pages skipped, files beyond `FAMILY_CAP` per family
(man page name stem, top directory) skipped, and dealt into the domain's splits in a
fixed order, each split taking files until it holds its byte cap (`CAPS`). A split is thus a function
of the path hashes and the installed files only; nothing depends on the walk order or on Python's
salted `hash`.

Splits: `general_train` (python + c + perl, equal byte caps) and `domain_pretrain` (a little `man`,
~3% of the pretraining bytes) are what pretraining sees; `general_eval` (python + c + perl) and
`domain_eval` (`man`) are held out for evaluation; `domain_train` (`man`, disjoint from the rest) is
left for NEXUS to specialize on. `general_val` (python + c + perl, small) is dealt last, from the files
the other general splits left over: general text that neither pretraining nor the evaluation saw, for
choosing a checkpoint by its general loss (benchmarks/study.py --general-val). Being dealt last, it
leaves every other split as it was, and the corpus sha256 covers the other five splits only
(`DIGEST_SPLITS`), so builds recorded before it existed keep their corpus sha256.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from nexus import demo_data  # noqa: E402

GENERAL_DOMAINS = ("python", "c", "perl")
HELD_OUT = "man"
DOMAINS = GENERAL_DOMAINS + (HELD_OUT,)
# what the corpus sha256 covers: the splits a testbed build and its scores depend on
DIGEST_SPLITS = ("general_train", "general_eval", "domain_pretrain", "domain_train", "domain_eval")
SPLITS = DIGEST_SPLITS + ("general_val",)

FILE_CAP = 32_000  # bytes kept of any one file (truncated at a line end), so big files do not dominate
# Per domain: (split, byte cap) in the order files are dealt; eval first so it never runs short, general_val
# last so that adding it moved no file of the others.
GENERAL_VAL_BYTES = 30_000
CAPS = {
    "python": (("general_eval", 220_000), ("general_train", 3_000_000), ("general_val", GENERAL_VAL_BYTES)),
    "c": (("general_eval", 220_000), ("general_train", 3_000_000), ("general_val", GENERAL_VAL_BYTES)),
    "perl": (("general_eval", 220_000), ("general_train", 3_000_000), ("general_val", GENERAL_VAL_BYTES)),
    "man": (("domain_eval", 300_000), ("domain_pretrain", 280_000), ("domain_train", 2_000_000)),
}


# At most this many files per family (see `family`), so that one big package cannot make up a domain:
# without it 16,631 of the 19,778 English man pages on the reference machine are google-cloud-cli's
# `gcloud_*` pages, and 100 of the C headers picked come from nodejs.
FAMILY_CAP = {"c": 30, "man": 8, "perl": 1_000_000, "python": 1_000_000}


def family(domain: str, path: str) -> str:
    """The group a file counts against for `FAMILY_CAP`.

    man: the page name up to its first `_`, `-` or `.` (`gcloud_compute_ssh.1.gz` -> `gcloud`,
    `git-log.1.gz` -> `git`); c and perl: the first directory below the domain's root (a file directly
    in the root is its own family); python: the top-level module or package.
    """
    if domain == "man":
        name = path.rsplit("/", 1)[-1]
        for sep in "_-.":
            name = name.split(sep, 1)[0]
        return name.lower()
    for root in roots(domain) if domain != "python" else [demo_data.stdlib_root()]:
        root_s = str(root).rstrip("/") + "/"
        if path.startswith(root_s):
            return root_s + path[len(root_s):].split("/", 1)[0]
    return path


def roots(domain: str) -> list[Path]:
    if domain == "python":
        return [demo_data.stdlib_root()]
    if domain == "c":
        return [Path("/usr/include")]
    if domain == "perl":
        return sorted({Path(p) for p in ["/usr/share/perl", "/usr/share/perl5",
                                          *glob.glob("/usr/lib/*-linux-gnu/perl"),
                                          *glob.glob("/usr/lib/*-linux-gnu/perl5")] if Path(p).is_dir()})
    if domain == "man":
        return [Path("/usr/share/man")]
    raise ValueError(f"unknown domain {domain!r}")


def _walk(root: Path, accept) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            full = Path(dirpath) / name
            rel = full.relative_to(root).as_posix()
            if accept(rel) and not full.is_symlink() and full.is_file():
                out.append(str(full))
    return out


def candidates(domain: str) -> list[str]:
    """Sorted absolute paths of the domain's candidate files on this machine."""
    if domain == "python":
        root = demo_data.stdlib_root()
        return sorted(str(root / rel) for rel in demo_data.stdlib_files())
    if domain == "c":
        return sorted(_walk(Path("/usr/include"), lambda rel: rel.endswith(".h")))
    if domain == "perl":
        return sorted(p for r in roots("perl") for p in _walk(r, lambda rel: rel.endswith(".pm")))
    if domain == "man":  # English pages only: the top-level man1..man8, not the translations beside them
        return sorted(_walk(Path("/usr/share/man"), lambda rel: rel.split("/")[0] in {f"man{i}" for i in range(1, 9)}
                            and rel.count("/") == 1))
    raise ValueError(f"unknown domain {domain!r}")


def hash_key(domain: str, path: str) -> bytes:
    """Stable order key: sha256 of `domain:path` (identical on every machine and run)."""
    return hashlib.sha256(f"{domain}:{path}".encode("utf-8")).digest()


def truncate(text: str, cap: int = FILE_CAP) -> str:
    """At most `cap` UTF-8 bytes of `text`, cut at the last line end inside the cap."""
    data = text.encode("utf-8")
    if len(data) <= cap:
        return text
    cut = data[:cap]
    end = cut.rfind(b"\n")
    return cut[: end + 1 if end > 0 else cap].decode("utf-8", errors="ignore")


def read_text(path: str) -> str | None:
    """The file's text (gunzipped for `.gz`), or None when empty, not UTF-8, or a roff `.so` redirect."""
    try:
        raw = gzip.open(path).read() if path.endswith(".gz") else Path(path).read_bytes()
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError, EOFError):
        return None
    if not text.strip() or text.lstrip().startswith(".so "):
        return None
    return text


def deal(domain: str, paths: list[str], caps, read=read_text, family_of=None,
         family_cap: int | None = None) -> dict[str, list[tuple[str, str]]]:
    """Deal `paths` (in hash order) into the splits of `caps` [(split, bytes)]: {split: [(path, text)]}.

    With `family_of` and `family_cap`, a file whose family already has `family_cap` files dealt is skipped.
    """
    out = {split: [] for split, _ in caps}
    per_family: dict[str, int] = {}
    held = {split: 0 for split, _ in caps}
    stage = 0
    for path in sorted(paths, key=lambda p: (hash_key(domain, p), p)):
        while stage < len(caps) and held[caps[stage][0]] >= caps[stage][1]:
            stage += 1
        if stage == len(caps):
            break
        fam = family_of(path) if family_of is not None and family_cap is not None else None
        if fam is not None and per_family.get(fam, 0) >= family_cap:
            continue
        text = read(path)
        if text is None:
            continue
        if fam is not None:
            per_family[fam] = per_family.get(fam, 0) + 1
        text = truncate(text)
        split = caps[stage][0]
        out[split].append((path, text))
        held[split] += len(text.encode("utf-8"))
    return out


def _dpkg_owners(paths: set[str]) -> dict[str, str]:
    """{path: package} from dpkg's file lists (empty where dpkg is absent)."""
    owners = {}
    for lst in sorted(glob.glob("/var/lib/dpkg/info/*.list")):
        pkg = Path(lst).name[: -len(".list")].split(":")[0]
        try:
            for line in Path(lst).read_text(errors="replace").splitlines():
                if line in paths:
                    owners.setdefault(line, pkg)
        except OSError:
            pass
    return owners


def _dpkg_versions(packages: set[str]) -> dict[str, str]:
    if not packages:
        return {}
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f", "${Package}\t${Version}\n", *sorted(packages)],
                             capture_output=True, text=True, check=False).stdout
    except OSError:
        return {}
    return dict(sorted(line.split("\t", 1) for line in out.splitlines() if "\t" in line))


def build_corpus(domains=DOMAINS, with_packages: bool = True) -> dict:
    """All splits' texts and the manifest (counts, bytes, sources, package versions)."""
    texts = {split: [] for split in SPLITS}
    manifest = {"python_version": platform.python_version(), "implementation": sys.implementation.name,
                "general_domains": list(GENERAL_DOMAINS), "held_out_domain": HELD_OUT, "file_cap": FILE_CAP,
                "domains": {}, "splits": {}}
    for domain in domains:
        cands = candidates(domain)
        dealt = deal(domain, cands, CAPS[domain], family_of=lambda p, d=domain: family(d, p),
                     family_cap=FAMILY_CAP[domain])
        info = {"roots": [str(r) for r in roots(domain)], "candidate_files": len(cands),
                "family_cap": FAMILY_CAP[domain], "splits": {}}
        for split, items in dealt.items():
            texts[split].extend((domain, p, t) for p, t in items)
            info["splits"][split] = {"files": len(items), "bytes": sum(len(t.encode("utf-8")) for _, t in items)}
        if with_packages and domain != "python":
            used = {p for items in dealt.values() for p, _ in items}
            owners = _dpkg_owners(used)
            counts = {}
            for p in used:
                counts[owners.get(p, "(no package)")] = counts.get(owners.get(p, "(no package)"), 0) + 1
            versions = _dpkg_versions(set(counts) - {"(no package)"})
            info["packages"] = {pkg: {"version": versions.get(pkg), "files": n} for pkg, n in sorted(counts.items())}
        if domain == "python":
            info["python_version"] = platform.python_version()
        manifest["domains"][domain] = info
    for split in SPLITS:
        items = texts[split]
        manifest["splits"][split] = {"files": len(items), "bytes": sum(len(t.encode("utf-8")) for _, _, t in items),
                                     "domains": sorted({d for d, _, _ in items})}
    digest = hashlib.sha256()
    for split in DIGEST_SPLITS:
        for domain, path, text in texts[split]:
            digest.update(f"{split}\0{domain}\0{path}\0".encode())
            digest.update(hashlib.sha256(text.encode("utf-8")).digest())
    manifest["sha256"] = digest.hexdigest()
    return {"texts": texts, "manifest": manifest}


def write_splits(corpus: dict, out_dir: Path) -> None:
    """Each split as JSONL ({"text", "domain", "path"} per file), e.g. for `nexus train` on domain_train."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, items in corpus["texts"].items():
        with open(out_dir / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for domain, path, text in items:
                f.write(json.dumps({"text": text, "domain": domain, "path": path}) + "\n")


if __name__ == "__main__":
    c = build_corpus()
    print(json.dumps(c["manifest"], indent=1))
