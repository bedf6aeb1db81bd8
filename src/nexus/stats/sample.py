"""Distribution-aware sampling: the run of `nexus sample` (see `nexus.stats.cli.sample`).

`draw_candidates` draws the candidate pool, `tokenize_truncated` tokenizes it, and `sample` selects
(`nexus.stats.sampling`, the pure part) and writes the JSONL.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..data import Document, iter_documents, load_tokenizer
from ..defaults import seq_len_for
from ..errors import NexusError
from ..fsutil import atomic_path
from .sampling import build_pool, select

_ENCODE_CHUNK = 256  # documents per tokenizer call


def draw_candidates(docs, max_candidates: int, seed: int) -> list[tuple[int, Document]]:
    """Up to `max_candidates` (index, document) pairs, uniformly at random (reservoir), in dataset order."""
    rng = np.random.default_rng(seed)
    reservoir: list[tuple[int, Document]] = []
    for i, doc in enumerate(docs):
        if len(reservoir) < max_candidates:
            reservoir.append((i, doc))
        else:
            j = int(rng.integers(0, i + 1))
            if j < max_candidates:
                reservoir[j] = (i, doc)
    return sorted(reservoir, key=lambda pair: pair[0])


def _backend(tokenizer):
    """A private copy of the tokenizer's Rust backend without truncation or padding, or None."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    from tokenizers import Tokenizer

    copy = Tokenizer.from_str(backend.to_str())
    copy.no_truncation()
    copy.no_padding()
    return copy


def tokenize_truncated(texts: list[str], tokenizer, seq_len: int,
                       workers: int = 1) -> tuple[list[np.ndarray], list[str]]:
    """Token ids (no special tokens) of each text cut to `seq_len`, and each text cut to match."""
    backend = _backend(tokenizer)

    def encode(chunk: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
        if backend is not None:  # releases the GIL: threads run in parallel
            return [(e.ids, e.offsets) for e in backend.encode_batch(chunk, add_special_tokens=False)]
        enc = tokenizer(chunk, add_special_tokens=False, return_offsets_mapping=True)
        return list(zip(enc["input_ids"], enc["offset_mapping"]))

    chunks = [texts[i:i + _ENCODE_CHUNK] for i in range(0, len(texts), _ENCODE_CHUNK)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        encoded = [e for part in pool.map(encode, chunks) for e in part]
    ids_out, texts_out = [], []
    for text, (ids, offsets) in zip(texts, encoded):
        if len(ids) > seq_len:
            ids = ids[:seq_len]
            end = offsets[seq_len - 1][1]
            text = text[:end] if end > 0 else tokenizer.decode(ids)
        ids_out.append(np.asarray(ids, dtype=np.int64))
        texts_out.append(text)
    return ids_out, texts_out


def sample(dataset: str, tokenizer: str, output: str = "sample.jsonl", target_tokens: int = 1_000_000,
           max_candidates: int = 10_000, seq_len: int | None = None, objective: str = "distribution",
           workers: int = 1, seed: int = 0, text_field: str = "text", split: str | None = None) -> Path:
    """Write the sample JSONL (atomically) as `nexus sample` describes; arguments are its flags (and their
    defaults those of the flags). seq_len None: nexus.defaults.seq_len_for the tokenizer's model."""
    start = time.perf_counter()
    seq_len = seq_len_for(tokenizer, seq_len)
    tokenizer = load_tokenizer(tokenizer, what="--tokenizer", model_dir=False)
    docs = iter_documents(dataset, tokenizer, text_field, split)
    candidates = draw_candidates(docs, max_candidates, seed)
    if not candidates:
        raise NexusError(f"--dataset {dataset}: no non-empty documents")
    token_lists, texts = tokenize_truncated([d.text for _, d in candidates], tokenizer, seq_len, workers)
    keep = [i for i, t in enumerate(token_lists) if len(t) > 0]
    if not keep:
        raise NexusError(f"--dataset {dataset}: no document has any tokens")
    pool = build_pool([token_lists[i] for i in keep])
    tokenized = time.perf_counter()
    sel = select(pool, target_tokens, objective)
    selected = time.perf_counter()

    out = Path(output)
    with atomic_path(out) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for k in sel.order:
                i = keep[k]
                index, doc = candidates[i]
                record = {"text": texts[i], "tokens": len(token_lists[i]), "source_index": index, "source": doc.source}
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
    short = "" if sel.tokens >= target_tokens else f" (pool exhausted before --target-tokens {target_tokens:,})"
    print(f"sampled {len(sel.order):,} of {pool.num_candidates:,} candidates, {sel.tokens:,} tokens{short}; "
          f"coverage {100 * sel.coverage:.1f}% of the pool's {len(pool.vocab):,} token ids; "
          f"KL(selected || pool) {sel.kl:.4f} nats [{objective}; read+tokenize {tokenized - start:.1f} s, "
          f"select {selected - tokenized:.1f} s] -> {out}")
    return out
