"""The one data path (nexus.packing): packed and chunked sequences by offsets, against plain list code."""

import random

import numpy as np
import pytest

from nexus.errors import NexusError
from nexus.packing import Packer, Pieces, chunk_offsets, iter_pieces, tokenize_batches


def _docs(seed: int, n: int = 40, longest: int = 50) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(5, 90) for _ in range(rng.randint(0, longest))] + [1] for _ in range(n)]


def _flat(docs):
    return np.array([t for d in docs for t in d], dtype=np.int32), np.array([len(d) for d in docs])


def _packed_reference(docs, seq_len):
    tokens = [t for d in docs for t in d]
    return [tokens[i:i + seq_len] for i in range(0, len(tokens) - seq_len + 1, seq_len)]


def _chunked_reference(docs, seq_len, min_len):
    out = []
    for d in docs:
        if len(d) > seq_len and len(d) % seq_len == 1:
            d = d[:-1]  # no piece of only the EOS of a long document
        for i in range(0, len(d), seq_len):
            if len(d[i:i + seq_len]) >= min_len:
                out.append(d[i:i + seq_len])
    return out


@pytest.mark.parametrize("seq_len", [2, 7, 16, 64])
@pytest.mark.parametrize("feed", [1, 5, 40])  # documents per feed: the packed remainder crosses calls
def test_packed_sequences_are_the_concatenation_cut_in_full_pieces(seq_len, feed):
    docs = _docs(seq_len)
    packer, got = Packer(seq_len, pack=True), []
    for i in range(0, len(docs), feed):
        got += packer.feed(*_flat(docs[i:i + feed])).tolist()
    assert got == _packed_reference(docs, seq_len) and got


@pytest.mark.parametrize("seq_len", [1, 2, 7, 16])
@pytest.mark.parametrize("min_len", [1, 2])
def test_chunked_pieces_never_span_documents(seq_len, min_len):
    docs = _docs(100 + seq_len) + [[1], [5, 1], [5] * (2 * seq_len) + [1], [5] * (seq_len - 1) + [1]]
    got = Packer(seq_len, pack=False, min_len=min_len).feed(*_flat(docs)).tolist()
    assert got == _chunked_reference(docs, seq_len, min_len)


def test_padded_and_limit_tokens():
    docs = [[5, 6, 7, 8, 9, 1], [10, 11, 1], [12, 1]]
    pieces = Packer(4, pack=False).feed(*_flat(docs))
    ids, lengths = pieces.padded(4, pad_id=0)
    assert ids.tolist() == [[5, 6, 7, 8], [9, 1, 0, 0], [10, 11, 1, 0], [12, 1, 0, 0]]
    assert lengths.tolist() == [4, 2, 3, 2]
    assert pieces.limit_tokens(7).tolist() == [[5, 6, 7, 8], [9, 1], [10]]
    assert pieces.limit_tokens(6).tolist() == [[5, 6, 7, 8], [9, 1]]
    assert pieces.limit_tokens(100).tolist() == pieces.tolist()
    packed = Packer(4).feed(*_flat(docs))
    ids, lengths = packed.padded(4, pad_id=0)
    assert ids.tolist() == [[5, 6, 7, 8], [9, 1, 10, 11]] and lengths.tolist() == [4, 4]


def test_one_long_document_is_cut_in_linear_work():
    n = 2_000_001  # one document (a .txt file): the old list slicing took seconds here
    pieces = Packer(1000).feed(np.arange(n, dtype=np.int32), np.array([n]))
    assert len(pieces) == n // 1000 and pieces.tokens[pieces.starts[-1]] == (n // 1000 - 1) * 1000
    starts, stops = chunk_offsets(np.array([n]), 1000)
    assert len(starts) == n // 1000 and stops[-1] == n - 1  # the lone last token (EOS) makes no piece


def test_tokenize_batches_uses_one_batch_call_per_batch():
    calls = []

    class Tok:
        eos_token_id = 1

        def __call__(self, texts, add_special_tokens=False):
            calls.append(len(texts))
            return {"input_ids": [[int(w) for w in t.split()] for t in texts]}

    texts = [" ".join(str(5 + j) for j in range(i % 7)) for i in range(1200)]
    out = list(tokenize_batches(texts, Tok()))
    assert calls == [512, 512, 176]
    tokens = np.concatenate([t for t, _ in out])
    lengths = np.concatenate([n for _, n in out])
    assert lengths.tolist() == [i % 7 + 1 for i in range(1200)]
    assert tokens.tolist() == [t for i in range(1200) for t in [5 + j for j in range(i % 7)] + [1]]
    counts = {}
    seqs = [s for p in iter_pieces(texts, Tok(), 8, counts=counts) for s in p.tolist()]
    assert counts == {"docs": 1200, "tokens": len(tokens)} and len(seqs) == len(tokens) // 8


def test_seq_len_checks():
    with pytest.raises(NexusError, match="--seq-len must be at least 2"):
        Packer(1, pack=True)
    assert isinstance(Packer(1, pack=False).feed(*_flat([[5, 1]])), Pieces)
