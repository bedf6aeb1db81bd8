"""The training data stream: deterministic, shardable across ranks, resumable at any position.

A dataset becomes a fixed set of `seq_len` sequences (packed across documents, or one document per
sequence, chunked and right-padded). The *stream* is an endless sequence of positions 0, 1, 2, …;
position p reads sequence `perm_e[p mod n]` of epoch e = p // n, where `perm_e` is a permutation
seeded by (seed, e). Optimizer step s, micro-step m, rank r of W reads the B positions starting at

    s × G + (m × W + r) × B,      G = B × accumulation × W  (the global batch)

so ranks never read the same position, one process with W × the accumulation reads exactly the same
positions per step as W processes, resuming at step s needs nothing but s, and `precompute-teacher`
can store the teacher's outputs for position p in advance.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from .data import iter_documents
from .errors import NexusError
from .packing import iter_pieces


@dataclass(frozen=True)
class DataSpec:
    """Everything that decides the stream; recorded in run configs and teacher caches."""

    dataset: str
    seq_len: int
    pack: bool = True
    seed: int = 0
    shuffle: bool = True
    text_field: str = "text"
    split: str | None = None

    def describe(self) -> dict:
        return {"dataset": self.dataset, "seq_len": self.seq_len, "pack": self.pack, "seed": self.seed,
                "shuffle": self.shuffle, "text_field": self.text_field, "split": self.split}


@dataclass
class SequenceSet:
    """n fixed-length sequences: ids (n, L) int32 and real lengths (n,) int32 (L when packed)."""

    ids: np.ndarray
    lengths: np.ndarray
    pad_id: int

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.ids.shape[1])

    def fingerprint(self) -> str:
        """Hash of the sequences (ids and lengths), independent of order and seed."""
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(self.ids).tobytes())
        h.update(np.ascontiguousarray(self.lengths).tobytes())
        return h.hexdigest()[:16]


def build_sequences(spec: DataSpec, tokenizer, flag: str = "--dataset") -> SequenceSet:
    """Read, tokenize and pack (or chunk and pad) a dataset into `spec.seq_len` sequences."""
    texts = (d.text for d in iter_documents(spec.dataset, tokenizer, spec.text_field, spec.split, flag))
    counts: dict = {}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    blocks = [p.padded(spec.seq_len, pad_id) for p in iter_pieces(texts, tokenizer, spec.seq_len, spec.pack,
                                                                   counts=counts)]
    if not counts.get("docs"):
        raise NexusError(f"{flag} {spec.dataset}: no non-empty documents")
    if not blocks:
        raise NexusError(f"{flag} {spec.dataset}: {counts['tokens']} tokens make no sequence of --seq-len "
                         f"{spec.seq_len}" + (" (packing drops the last partial sequence; use a smaller --seq-len "
                                              "or --no-pack)" if spec.pack else ""))
    ids = np.concatenate([b[0] for b in blocks])  # (n, L)
    lengths = np.concatenate([b[1] for b in blocks])  # (n,)
    return SequenceSet(ids, lengths, int(pad_id))


@lru_cache(maxsize=4)
def _permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    key = int.from_bytes(hashlib.sha256(f"nexus-stream:{seed}:{epoch}".encode()).digest()[:8], "little")
    g = torch.Generator().manual_seed(key)
    return torch.randperm(n, generator=g).numpy()


class SequenceStream:
    """Positions of the endless stream -> batches of a `SequenceSet`."""

    def __init__(self, seqs: SequenceSet, seed: int = 0, shuffle: bool = True):
        self.seqs, self.seed, self.shuffle = seqs, seed, shuffle

    def index(self, position: int) -> int:
        n = len(self.seqs)
        epoch, offset = divmod(int(position), n)
        return int(_permutation(n, self.seed, epoch)[offset]) if self.shuffle else offset

    def batch(self, positions) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids (B, L) int64 and attention_mask (B, L) int64 of the given stream positions."""
        idx = np.array([self.index(p) for p in positions], dtype=np.int64)
        ids = torch.from_numpy(self.seqs.ids[idx].astype(np.int64))  # (B, L)
        lengths = torch.from_numpy(self.seqs.lengths[idx].astype(np.int64))  # (B,)
        mask = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()  # (B, L)
        return ids, mask


@dataclass(frozen=True)
class StepLayout:
    """Which stream positions each (step, micro-step, rank) reads."""

    batch_size: int
    accumulation: int = 1
    world_size: int = 1

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.accumulation * self.world_size

    def positions(self, step: int, micro: int, rank: int) -> range:
        start = step * self.global_batch + (micro * self.world_size + rank) * self.batch_size
        return range(start, start + self.batch_size)


def trim_padding(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop trailing columns that are padding in every row (right padding: changes no real token)."""
    length = int(attention_mask.sum(1).max())
    return input_ids[:, :length], attention_mask[:, :length]
