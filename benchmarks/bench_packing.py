"""Benchmark of the data path (nexus.packing): packing time is linear in tokens, up to 100 M tokens.

    python benchmarks/bench_packing.py                   # all parts (about 2 minutes on 2 cores)
    python benchmarks/bench_packing.py --max-tokens 1e7  # smaller sizes only
    python benchmarks/bench_packing.py --part 2          # tokenizer + packer only

1. The packer on synthetic token ids (int32, no tokenizer), two layouts: one document (a `.txt` file
   is one document: the worst case of the old list-slicing packer) and documents of 1,000 tokens.
   "new" = `Packer.feed` + `Pieces.padded` (what `nexus train` builds: an (n, seq_len) array);
   "new, chunked" = the same without packing (one document per sequence, padded). "old" = the packer
   these replaced (copied below), on Python lists, run up to --old-max-tokens.
2. Tokenizing + packing generated text with a word-level fast tokenizer (tests/tiny.py):
   the old per-text tokenizer loop + old packer vs `iter_pieces` (batched tokenizer calls).

Each figure is the best of --repeats runs (the machine is shared), in seconds and tokens/s.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

from nexus.packing import Packer, iter_pieces  # noqa: E402

SEQ_LEN = 1024


def old_pack(token_lists, seq_len: int, drop_last: bool = True) -> list[list[int]]:
    """The packer `nexus.data.pack` was before nexus.packing (verbatim): quadratic in one document."""
    buf: list[int] = []
    seqs = []
    for ids in token_lists:
        buf.extend(ids)
        while len(buf) >= seq_len:
            seqs.append(buf[:seq_len])
            buf = buf[seq_len:]
    if buf and not drop_last:
        seqs.append(buf)
    return seqs


def old_tokenize(texts, tokenizer) -> list[list[int]]:
    """The old per-text tokenizer loop (one tokenizer call per document), EOS appended."""
    return [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in texts]


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def synthetic(n_tokens: int, doc_len: int | None) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.random.default_rng(0).integers(4, 50_000, size=n_tokens, dtype=np.int32)
    if doc_len is None:
        return tokens, np.array([n_tokens])
    lengths = np.full(n_tokens // doc_len, doc_len)
    lengths[-1] += n_tokens - lengths.sum()
    return tokens, lengths


def part1(sizes: list[int], old_max: int, repeats: int) -> None:
    print(f"\n1. packer, synthetic ids, seq_len {SEQ_LEN}; best of {repeats}")
    print("| tokens | layout | new packed (s) | tok/s | new chunked (s) | tok/s | old packed (s) | tok/s |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for n in sizes:
        for layout, doc_len in (("1 document", None), ("1,000-token documents", 1000)):
            tokens, lengths = synthetic(n, doc_len)
            t_new = best(lambda: Packer(SEQ_LEN).feed(tokens, lengths).padded(SEQ_LEN, 0), repeats)
            t_chunk = best(lambda: Packer(SEQ_LEN, pack=False).feed(tokens, lengths).padded(SEQ_LEN, 0), repeats)
            if n <= old_max:
                ends = np.cumsum(lengths)
                lists = [tokens[a:b].tolist() for a, b in zip(ends - lengths, ends)]
                t_old = best(lambda: old_pack(lists, SEQ_LEN), repeats)
                old = f"{t_old:.3f} | {n / t_old:,.0f}"
                del lists
            else:
                old = "– | –"
            print(f"| {n:,} | {layout} | {t_new:.4f} | {n / t_new:,.0f} | {t_chunk:.3f} | {n / t_chunk:,.0f} | {old} |",
                  flush=True)
            tokens = lengths = None  # free before the next size is generated


def part2(n_tokens: int, repeats: int) -> None:
    from tiny import WORDS, save_tokenizer
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as d:
        tok = AutoTokenizer.from_pretrained(str(save_tokenizer(d)))
    rng = random.Random(0)
    print(f"\n2. tokenize + pack, word-level fast tokenizer, seq_len {SEQ_LEN}; best of {repeats}")
    print("| tokens | layout | old per-text loop + old packer (s) | batched iter_pieces (s) | speed-up |")
    print("|---:|---|---:|---:|---:|")
    for layout, doc_words in (("200-word documents", 200), ("1 document", n_tokens)):
        texts = [" ".join(rng.choice(WORDS) for _ in range(doc_words)) for _ in range(max(1, n_tokens // doc_words))]
        new = [s for p in iter_pieces(texts, tok, SEQ_LEN) for s in p.tolist()]
        assert new == old_pack(old_tokenize(texts, tok), SEQ_LEN)  # same sequences
        t_old = best(lambda: old_pack(old_tokenize(texts, tok), SEQ_LEN), repeats)
        t_new = best(lambda: [p.padded(SEQ_LEN, 0) for p in iter_pieces(texts, tok, SEQ_LEN)], repeats)
        print(f"| {n_tokens:,} | {layout} | {t_old:.2f} | {t_new:.2f} | {t_old / t_new:.1f}× |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-tokens", type=float, default=1e8, help="largest size of part 1 (default 1e8)")
    p.add_argument("--old-max-tokens", type=float, default=2e6, help="largest size the old packer runs (2e6)")
    p.add_argument("--text-tokens", type=float, default=1e6, help="tokens of part 2 (default 1e6)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--part", choices=("1", "2", "all"), default="all")
    args = p.parse_args()
    sizes = [n for n in (250_000, 500_000, 1_000_000, 2_000_000, 10_000_000, 100_000_000) if n <= args.max_tokens]
    if args.part in ("1", "all"):
        part1(sizes, int(args.old_max_tokens), args.repeats)
    if args.part in ("2", "all"):
        part2(int(args.text_tokens), args.repeats)


if __name__ == "__main__":
    main()
