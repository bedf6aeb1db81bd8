"""Distribution-aware sampling: pick documents whose tokens represent the whole dataset.

    nexus sample --dataset data/ --tokenizer path/to/model --target-tokens 1000000 --output sample.jsonl
    nexus sample --dataset chats.jsonl --tokenizer path/to/model --objective coverage --workers 4

Up to --max-candidates documents are drawn (uniformly at random with --seed when the dataset holds
more), rendered (chat records through the tokenizer's chat template), tokenized and truncated to
--seq-len tokens. Then candidates are added greedily until the selection holds --target-tokens:
`--objective distribution` (default, what the original tool did) minimizes KL(selected unigram ||
pool unigram); `--objective coverage` maximizes the number of distinct token ids covered. Ties go
to the lowest candidate index, so a run is reproducible.

Output: one JSON record per selected document, in the order picked (the most representative
first, so any prefix is itself a good sample): {"text", "tokens", "source_index", "source"}.
`text` is cut at the end of the last kept token when a document was truncated; `tokens` counts
its tokens without special tokens. `nexus collect --dataset sample.jsonl` reads it.
"""

from __future__ import annotations

import argparse
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
from ..rerun import nothing_written
from .sampling import OBJECTIVES, build_pool, select

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


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", required=True,
                   help="a .txt/.jsonl/.json/.parquet file, a folder of them, or a saved Hugging Face dataset")
    p.add_argument("--tokenizer", required=True, help="model (or adapter) directory whose tokenizer to use")
    p.add_argument("--output", default="sample.jsonl", help="JSONL file to write (default sample.jsonl)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--target-tokens", type=int, default=1_000_000,
                   help="stop once the selection holds this many tokens (default 1000000)")
    p.add_argument("--max-candidates", type=int, default=10_000,
                   help="documents drawn from the dataset as the candidate pool (default 10000)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="truncate each document to this many tokens (default 1024, or the model's "
                        "max_position_embeddings when the --tokenizer directory holds a smaller one)")
    p.add_argument("--objective", choices=OBJECTIVES, default="distribution",
                   help="distribution: min KL(selected || pool) unigram (default); coverage: max distinct tokens")
    p.add_argument("--workers", type=int, default=1, help="tokenizer threads (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed for drawing candidates (default 0)")
    p.add_argument("--text-field", default="text",
                   help="record field holding the text (default text; records with `messages` are chats)")
    p.add_argument("--split", default=None, help="split of a saved Hugging Face DatasetDict (default train)")


def check_options(args) -> None:
    """Flag values alone (no file access); `nexus pipeline` checks these before any stage runs."""
    for flag, value, low in (("--target-tokens", args.target_tokens, 1), ("--max-candidates", args.max_candidates, 1),
                             ("--seq-len", args.seq_len, 1), ("--workers", args.workers, 1)):
        if value is not None and value < low:
            raise NexusError(f"{flag} must be at least {low}, got {value}")


def _check_args(args) -> None:
    check_options(args)
    args.seq_len = seq_len_for(args.tokenizer, args.seq_len)
    if Path(args.output).exists() and not args.overwrite:
        raise NexusError(f"--output {args.output} exists (pass --overwrite to replace it)")


interrupted = nothing_written  # the Ctrl-C message: the output is written atomically


def run(args) -> int:
    _check_args(args)
    start = time.perf_counter()
    tokenizer = load_tokenizer(args.tokenizer, what="--tokenizer", model_dir=False)
    docs = iter_documents(args.dataset, tokenizer, args.text_field, args.split)
    candidates = draw_candidates(docs, args.max_candidates, args.seed)
    if not candidates:
        raise NexusError(f"--dataset {args.dataset}: no non-empty documents")
    token_lists, texts = tokenize_truncated([d.text for _, d in candidates], tokenizer, args.seq_len, args.workers)
    keep = [i for i, t in enumerate(token_lists) if len(t) > 0]
    if not keep:
        raise NexusError(f"--dataset {args.dataset}: no document has any tokens")
    pool = build_pool([token_lists[i] for i in keep])
    tokenized = time.perf_counter()
    sel = select(pool, args.target_tokens, args.objective)
    selected = time.perf_counter()

    out = Path(args.output)
    with atomic_path(out) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for k in sel.order:
                i = keep[k]
                index, doc = candidates[i]
                record = {"text": texts[i], "tokens": len(token_lists[i]), "source_index": index, "source": doc.source}
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
    short = "" if sel.tokens >= args.target_tokens else \
        f" (pool exhausted before --target-tokens {args.target_tokens:,})"
    print(f"sampled {len(sel.order):,} of {pool.num_candidates:,} candidates, {sel.tokens:,} tokens{short}; "
          f"coverage {100 * sel.coverage:.1f}% of the pool's {len(pool.vocab):,} token ids; "
          f"KL(selected || pool) {sel.kl:.4f} nats [{args.objective}; read+tokenize {tokenized - start:.1f} s, "
          f"select {selected - tokenized:.1f} s] -> {out}")
    return 0
