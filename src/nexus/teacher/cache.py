"""The teacher cache format (DESIGN "Teacher cache"): writing shards, the manifest, and reading.

    cache/
      manifest.json             format, version, teacher, tokenizer fingerprint, seq_len, top_k,
                                sequence count, data spec, shards [{file, first, sequences, sha256, bytes}]
      shard-00000.safetensors   input_ids int32 (n, L), attention_mask uint8 (n, L),
                                topk_logprobs float16 (n, L, k), topk_indices int32 (n, L, k)
                                [+ router_topk_logprobs float16 (n, L, layers, R),
                                   router_topk_indices int16 (n, L, layers, R)]

Row j of shard i is stream position `first + j` (see `nexus.stream`). Log-probabilities are
at temperature 1, of the distribution at position t (which predicts token t + 1); padding positions
hold zeros. Each shard is written atomically, with a small `.shard-XXXXX.json` beside it recording
its checksum, so an interrupted run keeps every complete shard and the manifest is written last.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import NexusError
from ..fsutil import atomic_path, read_json, write_json

FORMAT = "nexus-teacher-cache"
VERSION = 1
MANIFEST = "manifest.json"
PLAN = ".plan.json"  # the header of a cache being written, to refuse resuming with other arguments
LOGPROB_BYTES, INDEX_BYTES = 2, 4  # float16 log-prob and int32 index per stored token
ID_BYTES, MASK_BYTES = 4, 1  # int32 input id and uint8 attention mask per position
ROUTER_BYTES = 2 + 2  # float16 log-prob + int16 expert index per (layer, r)


def bytes_per_token(top_k: int, router_layers: int = 0, router_topk: int = 0) -> int:
    """Storage per sequence position: k × 6 + 5 (+ layers × R × 4 with router top-R)."""
    return top_k * (LOGPROB_BYTES + INDEX_BYTES) + ID_BYTES + MASK_BYTES + router_layers * router_topk * ROUTER_BYTES


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def _sidecar(directory: Path, index: int) -> Path:
    return directory / f".shard-{index:05d}.json"


def file_sha256(path: str | os.PathLike, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def write_shard(directory: Path, index: int, first: int, tensors: dict[str, torch.Tensor]) -> dict:
    """Write one shard atomically, then its sidecar; returns its manifest entry."""
    path = directory / shard_name(index)
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={"format": FORMAT, "version": str(VERSION), "first": str(first)})
    entry = {"file": path.name, "first": int(first), "sequences": int(tensors["input_ids"].shape[0]),
             "tokens": int(tensors["attention_mask"].sum()), "sha256": file_sha256(path),
             "bytes": path.stat().st_size}
    write_json(_sidecar(directory, index), entry)
    return entry


def completed_shards(directory: Path) -> dict[int, dict]:
    """Shards already written (shard and sidecar present, size as recorded): index -> entry."""
    done = {}
    for side in directory.glob(".shard-*.json"):
        index = int(side.stem.split("-")[1])
        try:
            entry = json.loads(side.read_text())
        except (json.JSONDecodeError, OSError):
            continue
        shard = directory / shard_name(index)
        if shard.is_file() and shard.stat().st_size == entry.get("bytes"):
            done[index] = entry
    return done


def check_output(directory: Path) -> None:
    """An --output to write a cache into: absent, empty, or a (partial) cache; never someone else's files."""
    if not directory.exists() or (directory / MANIFEST).is_file() or (directory / PLAN).is_file():
        return
    if directory.is_file() or any(directory.iterdir()):
        raise NexusError(f"--output {directory}: exists and is not a teacher cache (no {MANIFEST} or {PLAN}); "
                         f"choose another --output")


def check_plan(directory: Path, header: dict) -> None:
    """Record what this cache will hold, or refuse to continue a partial cache made differently."""
    plan = directory / PLAN
    if plan.is_file():
        old = read_json(plan, "teacher cache plan")
        diff = sorted(k for k in set(old) | set(header) if old.get(k) != header.get(k) and k != "nexus_version")
        if diff:
            raise NexusError(f"--output {directory}: holds a partial teacher cache made with different settings "
                             f"({', '.join(f'{k}: {old.get(k)!r} -> {header.get(k)!r}' for k in diff[:4])}); "
                             f"use another --output or the same arguments to continue it")
    else:
        write_json(plan, header)


def write_manifest(directory: Path, header: dict, shards: dict[int, dict]) -> dict:
    entries = [shards[i] for i in sorted(shards)]
    manifest = {"format": FORMAT, "version": VERSION, **header,
                "tokens": sum(e["tokens"] for e in entries), "shards": entries}
    write_json(directory / MANIFEST, manifest)
    return manifest


class TeacherCache:
    """Read-only view of a complete cache; `read(positions)` returns the rows of those stream positions."""

    def __init__(self, directory: str | os.PathLike, verify: bool = True):
        self.dir = Path(directory)
        if not self.dir.is_dir():
            raise NexusError(f"--precomputed-teacher {directory}: no such directory")
        if not (self.dir / MANIFEST).is_file():
            hint = " (it looks unfinished: run precompute-teacher again to complete it)" \
                if (self.dir / PLAN).is_file() else ""
            raise NexusError(f"--precomputed-teacher {directory}: no {MANIFEST}{hint}")
        m = read_json(self.dir / MANIFEST, "teacher cache manifest")
        if m.get("format") != FORMAT:
            raise NexusError(f"{self.dir / MANIFEST}: not a NEXUS teacher cache (format != '{FORMAT}')")
        if int(m.get("version", 0)) > VERSION:
            raise NexusError(f"{self.dir / MANIFEST}: cache version {m['version']} is newer than this NEXUS "
                             f"understands ({VERSION})")
        self.manifest = m
        self.verify = verify
        try:
            self.shards = sorted(m["shards"], key=lambda e: e["first"])
            expected = 0
            for e in self.shards:
                if e["first"] != expected:
                    raise NexusError(f"{self.dir / MANIFEST}: shards do not cover positions {expected}.. "
                                     f"contiguously")
                expected += e["sequences"]
                path = self.dir / e["file"]
                if not path.is_file():
                    raise NexusError(f"{path}: shard listed in the manifest is missing")
                if path.stat().st_size != e["bytes"]:  # cheap; checksums are verified as each shard is opened
                    raise NexusError(f"{path}: {path.stat().st_size} bytes, the manifest records {e['bytes']} "
                                     f"(truncated or replaced)")
            if expected != m["num_sequences"]:
                raise NexusError(f"{self.dir / MANIFEST}: shards hold {expected} sequences, manifest says "
                                 f"{m['num_sequences']}")
        except (KeyError, TypeError) as e:
            raise NexusError(f"{self.dir / MANIFEST}: malformed teacher cache manifest ({type(e).__name__}: {e})") \
                from None
        self._open: dict[str, object] = {}

    def __len__(self) -> int:
        return int(self.manifest["num_sequences"])

    @property
    def seq_len(self) -> int:
        return self.manifest["seq_len"]

    @property
    def tokenizer_fingerprint(self) -> str:
        return self.manifest["tokenizer_fingerprint"]

    @property
    def vocab_size(self) -> int | None:
        return self.manifest.get("vocab_size")

    @property
    def router_topk(self) -> int | None:
        return self.manifest.get("router_topk")

    @property
    def moe_layers(self) -> list[int] | None:
        return self.manifest.get("moe_layers")

    @property
    def data(self) -> dict:
        """The data spec the cache was made from (dataset, seq_len, pack, seed, shuffle, text_field, split)."""
        return self.manifest.get("data") or {}

    def _handle(self, entry: dict):
        name = entry["file"]
        if name not in self._open:
            path = self.dir / name
            if not path.is_file():
                raise NexusError(f"{path}: shard listed in the manifest is missing")
            if self.verify and file_sha256(path) != entry["sha256"]:
                raise NexusError(f"{path}: checksum mismatch (the shard is corrupt or was replaced)")
            try:
                self._open[name] = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError) as e:
                raise NexusError(f"{path}: not a readable safetensors file ({e})") from None
        return self._open[name]

    def read(self, positions) -> dict[str, torch.Tensor]:
        """Rows of these stream positions: input_ids / attention_mask int64 (B, L), the rest as stored."""
        positions = list(positions)
        if not positions:
            raise ValueError("no positions")
        if max(positions) >= len(self) or min(positions) < 0:
            raise NexusError(f"--precomputed-teacher {self.dir}: holds {len(self)} sequences, position "
                             f"{max(positions)} was asked for (the run needs more sequences than were cached)")
        parts: dict[str, list[torch.Tensor]] = {}
        i = 0
        while i < len(positions):  # group consecutive positions inside one shard into one slice read
            entry = self._entry(positions[i])
            j = i
            end = entry["first"] + entry["sequences"]
            while j + 1 < len(positions) and positions[j + 1] == positions[j] + 1 and positions[j + 1] < end:
                j += 1
            a, b = positions[i] - entry["first"], positions[j] - entry["first"] + 1
            f = self._handle(entry)
            for key in f.keys():
                parts.setdefault(key, []).append(f.get_slice(key)[a:b])
            i = j + 1
        out = {k: torch.cat(v) for k, v in parts.items()}
        out["input_ids"] = out["input_ids"].long()
        out["attention_mask"] = out["attention_mask"].long()
        return out

    def _entry(self, position: int) -> dict:
        lo, hi = 0, len(self.shards) - 1
        while lo < hi:  # last shard whose first <= position
            mid = (lo + hi + 1) // 2
            if self.shards[mid]["first"] <= position:
                lo = mid
            else:
                hi = mid - 1
        return self.shards[lo]
