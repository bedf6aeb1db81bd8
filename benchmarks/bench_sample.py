"""Benchmark of `nexus sample`: greedy selection time, speed-up over the naive reference, end to end.

    python benchmarks/bench_sample.py                 # all parts
    python benchmarks/bench_sample.py --skip-cli      # selection only

1. Selection: 10,000 candidates of 32..1,024 tokens (Zipf-distributed ids over a 50k vocabulary, as
   natural text is) selected to 1M tokens, both objectives; pool construction + greedy, median of
   --repeats runs.
2. Speed-up against the naive reference of tests/test_sample.py (every step scores every remaining
   candidate from scratch) on a smaller pool; both must pick the same candidates.
3. The whole command (`python -m nexus sample`, --workers 2) on 10,000 generated documents with a
   byte-level BPE tokenizer trained here: reading, tokenizing, selecting and writing.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

from nexus.stats.sampling import build_pool, select  # noqa: E402


def zipf_pool(n: int, min_len: int, max_len: int, vocab: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    weights = 1 / np.arange(1, vocab + 1) ** 1.1
    lengths = rng.integers(min_len, max_len + 1, size=n)
    flat = rng.choice(vocab, size=int(lengths.sum()), p=weights / weights.sum())
    return np.split(flat, np.cumsum(lengths)[:-1])


def bench_selection(repeats: int) -> None:
    cands = zipf_pool(10_000, 32, 1024, 50_000)
    print(f"1. selection: {len(cands):,} candidates, {sum(map(len, cands)):,} tokens, target 1,000,000")
    for objective in ("distribution", "coverage"):
        times, build = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            pool = build_pool(cands)
            t1 = time.perf_counter()
            sel = select(pool, 1_000_000, objective)
            times.append(time.perf_counter() - t0)
            build.append(t1 - t0)
        print(f"   {objective:>12}: median {statistics.median(times):.2f} s (pool {statistics.median(build):.2f} s) "
              f"over {repeats} runs {[round(t, 2) for t in times]}; picked {len(sel.order):,} candidates, "
              f"{sel.tokens:,} tokens, coverage {sel.coverage:.1%}, KL {sel.kl:.4f}")


def bench_speedup(repeats: int) -> None:
    from test_sample import naive_greedy

    cands = [list(c) for c in zipf_pool(1_000, 16, 256, 5_000, seed=1)]
    target = sum(map(len, cands)) // 3
    print(f"2. speed-up over the naive reference: {len(cands):,} candidates of 16..256 tokens, target {target:,} tokens")
    for objective in ("distribution", "coverage"):
        fast_t, naive_t = [], []
        for _ in range(repeats):
            t = time.perf_counter()
            fast = select(build_pool(cands), target, objective).order
            fast_t.append(time.perf_counter() - t)
            t = time.perf_counter()
            naive = naive_greedy(cands, target, objective)
            naive_t.append(time.perf_counter() - t)
            assert fast == naive, f"{objective}: the fast greedy and the reference disagree"
        f, n = statistics.median(fast_t), statistics.median(naive_t)
        print(f"   {objective:>12}: fast {f * 1000:.1f} ms, naive {n:.2f} s -> {n / f:,.0f}x faster, same picks "
              f"({len(fast)} candidates; medians of {repeats})")


def bench_cli(workdir: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(30_000)]
    weights = [1 / (i + 1) ** 1.05 for i in range(len(words))]
    docs = [" ".join(rng.choices(words, weights, k=rng.randint(20, 700))) for _ in range(10_000)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(docs[:2000], trainers.BpeTrainer(vocab_size=16_000, special_tokens=["<eos>"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(str(workdir / "tok"))
    with open(workdir / "docs.jsonl", "w") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "nexus", "sample", "--dataset", str(workdir / "docs.jsonl"), "--tokenizer",
           str(workdir / "tok"), "--output", str(workdir / "sample.jsonl"), "--target-tokens", "1000000",
           "--seq-len", "1024", "--workers", "2"]
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    wall = time.perf_counter() - t
    print(f"3. `nexus sample` on 10,000 generated documents (byte-level BPE, 16k vocab), --workers 2: "
          f"{wall:.1f} s wall including Python start-up\n   {r.stdout.strip()}")
    m = re.search(r"read\+tokenize ([\d.]+) s, select ([\d.]+) s", r.stdout)
    if m:
        print(f"   read+tokenize {m.group(1)} s, select {m.group(2)} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-cli", action="store_true")
    args = ap.parse_args()
    print(f"machine: {os.cpu_count()} CPUs visible")
    bench_selection(args.repeats)
    bench_speedup(args.repeats)
    if not args.skip_cli:
        with tempfile.TemporaryDirectory() as tmp:
            bench_cli(Path(tmp))


if __name__ == "__main__":
    main()
