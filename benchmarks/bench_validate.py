"""Benchmark of `nexus validate`'s metrics: memory and time of `evaluate` against full (B, L, V) logits.

    python benchmarks/bench_validate.py                          # batch 4 x 512 tokens, gpt-oss's vocabulary
    python benchmarks/bench_validate.py --batch 1 --seq-len 2048 --repeats 3

A two-layer gpt-oss-architecture MoE (hidden 32, 8 experts) with gpt-oss's vocabulary, 201,088 tokens,
so that the LM head's logits dominate as they do at full size, with a random shared expert attached.
One batch of random tokens, two ways, each in its own process (peak RSS from `ru_maxrss`):

- "full logits": the model's own forward, (B, L, V) logits for the model and for its baseline (shared
  experts off), then `kl_divergence` and `nll` on them (what validate computed before `head_sums`);
- "evaluate": `nexus.validate.evaluate`, every metric, the LM heads applied a chunk of positions at a
  time to the final hidden states.

Both print the same perplexities and KL (checked here). Figures: peak RSS minus the RSS before the
batch (the model and the input), and the median seconds of --repeats runs. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 201_088  # gpt-oss's


def measure(way: str, batch: int, seq_len: int, repeats: int) -> dict:
    sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]
    import torch
    from conftest import tiny_model

    import nexus
    from nexus.shared import shared_experts_disabled
    from nexus.validate import evaluate, kl_divergence, nll, perplexity

    torch.manual_seed(0)
    model = nexus.attach_shared_experts(tiny_model("gpt_oss", vocab_size=VOCAB), init="random", seed=0, scale=20.0)
    ids = torch.randint(10, VOCAB, (batch, seq_len))
    mask = torch.ones_like(ids)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        if way == "evaluate":
            s = evaluate(model, [(ids, mask)]).summary()
            ppl, base_ppl, kl = s["perplexity"], s["baseline_perplexity"], s["kl"]
        else:
            with torch.inference_mode():
                with shared_experts_disabled(model):
                    base_logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                total, positions = kl_divergence(base_logits, logits, mask)
                ppl, base_ppl = (perplexity(*nll(x, ids, mask)) for x in (logits, base_logits))
                kl = total / positions
                del logits, base_logits
        seconds.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"way": way, "extra_mib": (peak - before) / 1024, "seconds": statistics.median(seconds),
            "perplexity": ppl, "baseline_perplexity": base_ppl, "kl": kl}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--child", choices=["full logits", "evaluate"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.batch, args.seq_len, args.repeats)))
        return 0
    rows = []
    for way in ("full logits", "evaluate"):
        out = subprocess.run([sys.executable, __file__, "--child", way, "--batch", str(args.batch), "--seq-len",
                              str(args.seq_len), "--repeats", str(args.repeats)],
                             check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    full, chunked = rows
    for key in ("perplexity", "baseline_perplexity", "kl"):
        if abs(full[key] - chunked[key]) > 1e-4 * abs(full[key]):
            raise SystemExit(f"{key} differs: full logits {full[key]}, evaluate {chunked[key]}")
    tokens = args.batch * args.seq_len
    print(f"batch {args.batch} x {args.seq_len} tokens, vocabulary {VOCAB:,}; median of {args.repeats}; "
          f"perplexity {chunked['perplexity']:.6g} / baseline {chunked['baseline_perplexity']:.6g}, "
          f"KL {chunked['kl']:.6g} both ways\n")
    print("| way | memory beyond the model (peak RSS) | seconds | tokens/s |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['way']} | {r['extra_mib']:,.0f} MiB | {r['seconds']:.1f} | {tokens / r['seconds']:,.0f} |")
    print(f"\nevaluate: {full['extra_mib'] / max(chunked['extra_mib'], 1):.1f}x less memory, "
          f"{full['seconds'] / chunked['seconds']:.2f}x the speed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
