"""Documents -> token ids -> sequences: the one data path of collect, train and validate.

Documents are tokenized a batch at a time with the tokenizer's batch call (for a fast tokenizer,
one call into Rust for many texts), EOS appended to each, into one flat int32 array plus each
document's length. A sequence is a (start, stop) offset pair into that array, so cutting costs
O(tokens) whatever the documents' sizes (a 100 M-token `.txt` file is one document):

  packed   documents concatenated and cut into full `seq_len` sequences; the tokens after the
           last full sequence of the data are dropped.
  chunked  each document cut into pieces of at most `seq_len` tokens, never spanning two documents.
           The lone last token (its EOS) of a document longer than `seq_len` makes no piece, and
           pieces shorter than `min_len` are dropped (2 where a next-token target is needed).

`benchmarks/bench_packing.py` measures it (docs/benchmarks.md).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import chain

import numpy as np

from .errors import NexusError

# Documents per tokenizer call, and characters (a bound on memory for long documents).
TOKENIZE_DOCS = 512
TOKENIZE_CHARS = 1 << 24


@dataclass
class Pieces:
    """Sequences as offsets into a flat token array: sequence i is tokens[starts[i]:stops[i]]."""

    tokens: np.ndarray  # (T,) int32
    starts: np.ndarray  # (n,) int64
    stops: np.ndarray  # (n,) int64

    def __len__(self) -> int:
        return int(self.starts.shape[0])

    @property
    def lengths(self) -> np.ndarray:
        return self.stops - self.starts  # (n,)

    def head(self, n: int) -> "Pieces":
        """The first `n` sequences."""
        return Pieces(self.tokens, self.starts[:n], self.stops[:n])

    def limit_tokens(self, budget: int) -> "Pieces":
        """The first sequences holding `budget` tokens in all (the last one cut short where needed)."""
        ends = np.cumsum(self.lengths)
        n = int(np.searchsorted(ends, budget, side="left")) + 1  # sequences reaching the budget
        if n > len(self):
            return self
        stops = self.stops[:n].copy()
        stops[-1] -= int(ends[n - 1]) - budget
        return Pieces(self.tokens, self.starts[:n], stops)

    def tolist(self) -> list[list[int]]:
        return [self.tokens[a:b].tolist() for a, b in zip(self.starts.tolist(), self.stops.tolist())]

    def padded(self, seq_len: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
        """ids (n, seq_len) int32 right-padded with `pad_id`, and lengths (n,) int32."""
        n = len(self)
        lengths = self.lengths.astype(np.int32)
        full = n == 0 or (int(self.starts[0]) == 0 and (lengths == seq_len).all()
                          and (np.diff(self.starts) == seq_len).all())
        if full:  # packed: consecutive full sequences are a reshape
            return self.tokens[:n * seq_len].reshape(n, seq_len).copy(), lengths
        ids = np.full((n, seq_len), pad_id, dtype=np.int32)
        block = max(1, (1 << 22) // seq_len)  # bounds the (rows, seq_len) index array below
        cols = np.arange(seq_len)
        for i in range(0, n, block):
            idx = self.starts[i:i + block, None] + cols[None, :]  # (rows, seq_len)
            real = cols[None, :] < lengths[i:i + block, None]
            rows = ids[i:i + block]
            rows[real] = self.tokens[idx[real]]
        return ids, lengths


def tokenize_batches(texts: Iterable[str], tokenizer, add_eos: bool = True) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Tokenize documents a batch at a time: yields (tokens (T,) int32, document lengths (D,) int64).

    No special tokens besides one EOS after each document (when `add_eos` and the tokenizer has one).
    """
    eos = tokenizer.eos_token_id if add_eos else None
    batch: list[str] = []
    chars = 0
    for text in texts:
        batch.append(text)
        chars += len(text)
        if len(batch) >= TOKENIZE_DOCS or chars >= TOKENIZE_CHARS:
            yield _encode(batch, tokenizer, eos)
            batch, chars = [], 0
    if batch:
        yield _encode(batch, tokenizer, eos)


def _encode(texts: list[str], tokenizer, eos: int | None) -> tuple[np.ndarray, np.ndarray]:
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]  # one list of ids per text
    tail = [] if eos is None else [eos]
    lengths = np.fromiter((len(x) + len(tail) for x in ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(chain.from_iterable(chain(x, tail) for x in ids), dtype=np.int32, count=int(lengths.sum()))
    return flat, lengths


def chunk_offsets(lengths: np.ndarray, seq_len: int, min_len: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """(starts, stops) of the chunked pieces of documents laid end to end (see the module docstring)."""
    lengths = np.asarray(lengths, dtype=np.int64)  # (D,)
    begins = np.cumsum(lengths) - lengths
    lone_eos = (lengths > seq_len) & (lengths % seq_len == 1)
    used = lengths - lone_eos
    counts = -(-used // seq_len)  # pieces per document
    doc = np.repeat(np.arange(len(lengths)), counts)  # (n,)
    first = np.cumsum(counts) - counts
    k = np.arange(len(doc)) - first[doc]  # piece index within its document
    starts = begins[doc] + k * seq_len
    stops = np.minimum(starts + seq_len, begins[doc] + used[doc])
    keep = stops - starts >= min_len
    return starts[keep], stops[keep]


class Packer:
    """Cuts a stream of tokenized documents into sequences, carrying a packed remainder between calls."""

    def __init__(self, seq_len: int, pack: bool = True, min_len: int = 2):
        if seq_len < 1 or (pack and seq_len < 2):
            raise NexusError(f"--seq-len must be at least {2 if pack else 1}, got {seq_len}")
        self.seq_len, self.pack, self.min_len = seq_len, pack, min_len
        self._carry = np.empty(0, dtype=np.int32)  # packed: tokens not yet in a full sequence (< seq_len)

    def feed(self, tokens: np.ndarray, lengths: np.ndarray) -> Pieces:
        """The sequences completed by these documents (tokens (T,), lengths (D,) summing to T)."""
        if not self.pack:
            return Pieces(tokens, *chunk_offsets(lengths, self.seq_len, self.min_len))
        if len(self._carry):
            tokens = np.concatenate([self._carry, tokens])
        n = len(tokens) // self.seq_len
        starts = np.arange(n, dtype=np.int64) * self.seq_len
        self._carry = tokens[n * self.seq_len:].copy()
        return Pieces(tokens, starts, starts + self.seq_len)


def iter_pieces(texts: Iterable[str], tokenizer, seq_len: int, pack: bool = True, min_len: int = 2,
                counts: dict | None = None) -> Iterator[Pieces]:
    """Sequences of documents, in data order, a tokenizer batch at a time (see the module docstring).

    `counts`, when given, is updated with the documents and tokens read so far ("docs", "tokens").
    """
    packer = Packer(seq_len, pack, min_len)
    for tokens, lengths in tokenize_batches(texts, tokenizer):
        if counts is not None:
            counts["docs"] = counts.get("docs", 0) + len(lengths)
            counts["tokens"] = counts.get("tokens", 0) + int(lengths.sum())
        pieces = packer.feed(tokens, lengths)
        if len(pieces):
            yield pieces
