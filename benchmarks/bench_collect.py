"""Benchmark of `nexus collect`: time overhead of the statistics over plain forwards, and file size.

    python benchmarks/bench_collect.py                       # both parts, defaults below
    python benchmarks/bench_collect.py --repeats 7 --family qwen3_moe

Overhead: the same batches run through the decoder stack with and without the statistics hooks
(`Collector`: softmax in float64, one p^T p matmul per layer and batch, top-k counts, gate sums,
entropy), interleaved so that both see the same machine load; medians over --repeats passes.
Size: bytes of router_stats.safetensors (written for real, empty sums) against raw float16
probabilities [tokens, layers, experts] at 1M tokens, for the shapes of real models.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from nexus.moe import find_moe_blocks  # noqa: E402
from nexus.routing import router_hooks  # noqa: E402
from nexus.stats.accumulate import Collector, RouterStats  # noqa: E402

# (name, MoE layers, experts per layer) of real checkpoints, for the size arithmetic
REAL_SHAPES = [("gpt-oss-20b", 24, 32), ("gpt-oss-120b", 36, 128), ("Qwen3-30B-A3B", 48, 128),
               ("Mixtral-8x7B", 32, 8), ("DeepSeek-V3", 58, 256)]


def bench_model(family: str):
    """A small model with realistic proportions (not tiny: the forward must dominate as it does in practice)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    common = dict(vocab_size=32000, hidden_size=512, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
                  num_hidden_layers=4, max_position_embeddings=4096)
    if family == "gpt_oss":
        kw = dict(common, intermediate_size=512, num_local_experts=32, num_experts_per_tok=4,
                  sliding_window=128, layer_types=["sliding_attention", "full_attention"] * 2,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    else:
        # Qwen3-30B-A3B's routing shape: 128 experts, top-8 (the O(E^2) statistics at their largest)
        kw = dict(common, intermediate_size=1024, moe_intermediate_size=256, num_experts=128, num_experts_per_tok=8,
                  norm_topk_prob=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **kw), dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("router.weight", "gate.weight")) and p.dim() == 2:
                p.normal_(0, 0.5)
    return model


def overhead(family: str, batch: int, seq_len: int, batches: int, repeats: int) -> dict:
    model = bench_model(family)
    decoder = model.get_decoder()
    g = torch.Generator().manual_seed(0)
    data = []
    for _ in range(batches):
        ids = torch.randint(0, 32000, (batch, seq_len), generator=g)
        mask = torch.ones_like(ids)
        mask[0, seq_len // 2:] = 0  # some padding, as real batches have
        data.append((ids, mask))
    stats = RouterStats.for_model(model)
    collector = Collector(stats)
    blocks = find_moe_blocks(model)
    in_hooks = [0.0]

    def timed_hook(*args):  # time spent inside the statistics code itself
        t = time.perf_counter()
        collector(*args)
        in_hooks[0] += time.perf_counter() - t

    def plain(ids, mask, b):
        decoder(input_ids=ids, attention_mask=mask, use_cache=False)

    def collect(ids, mask, b):  # what `nexus collect` does per batch
        with router_hooks(model, timed_hook, blocks):
            collector.set_batch(mask, b)
            decoder(input_ids=ids, attention_mask=mask, use_cache=False)

    # Pairs (plain, collect) on the same batch, back to back, in alternating order, so the load of
    # this shared machine affects both alike; each pair's time ratio is one sample.
    ratios, plain_t, collect_t, hook_frac = [], [], [], []
    with torch.no_grad():
        for rep in range(repeats + 1):  # pass 0 is a warm-up
            for b, (ids, mask) in enumerate(data):
                pair = {}
                for name in (("plain", "collect") if (rep + b) % 2 == 0 else ("collect", "plain")):
                    in_hooks[0] = 0.0
                    t = time.perf_counter()
                    (collect if name == "collect" else plain)(ids, mask, b)
                    pair[name] = time.perf_counter() - t
                if rep > 0:
                    ratios.append(pair["collect"] / pair["plain"])
                    plain_t.append(pair["plain"])
                    collect_t.append(pair["collect"])
                    hook_frac.append(in_hooks[0] / pair["collect"])
    return {"family": family, "tokens_per_batch": int(data[0][1].sum()), "pairs": len(ratios),
            "overhead_pct": 100 * (statistics.median(ratios) - 1),
            "plain_batch_s": statistics.median(plain_t), "collect_batch_s": statistics.median(collect_t),
            "hook_pct": 100 * statistics.median(hook_frac), "threads": torch.get_num_threads(),
            "ratio_quartiles": statistics.quantiles(ratios, n=4)}


def sizes() -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, layers, experts in REAL_SHAPES:
            path = Path(tmp) / f"{name}.safetensors"
            RouterStats(list(range(layers)), experts, 4, name).save(path)
            raw = 1_000_000 * layers * experts * 2  # float16
            rows.append({"model": name, "layers": layers, "experts": experts, "stats_bytes": path.stat().st_size,
                         "formula_bytes": layers * (experts * experts + 3 * experts + 2) * 8,
                         "raw_fp16_bytes_1M": raw})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", action="append", help="gpt_oss and/or qwen3_moe (default both)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batches", type=int, default=4, help="distinct batches per pass")
    ap.add_argument("--repeats", type=int, default=5, help="passes over the batches (after one warm-up pass)")
    args = ap.parse_args()
    for family in args.family or ["gpt_oss", "qwen3_moe"]:
        r = overhead(family, args.batch_size, args.seq_len, args.batches, args.repeats)
        q1, _, q3 = r["ratio_quartiles"]
        print(f"{family}: {r['tokens_per_batch']:,} real tokens/batch, {r['threads']} threads, {r['pairs']} pairs; "
              f"median batch: plain forward {r['plain_batch_s']:.3f} s, with statistics {r['collect_batch_s']:.3f} s; "
              f"overhead (median of per-pair ratios) {r['overhead_pct']:+.2f} % [IQR {100 * (q1 - 1):+.2f} .. "
              f"{100 * (q3 - 1):+.2f} %]; time inside the statistics hooks {r['hook_pct']:.2f} % of the pass")
    print("\nsize at 1M tokens: router_stats.safetensors vs raw float16 [tokens, layers, experts]")
    for row in sizes():
        mib, gib = row["stats_bytes"] / 2**20, row["raw_fp16_bytes_1M"] / 2**30
        print(f"{row['model']:>14}: {row['layers']} MoE layers x {row['experts']} experts: stats {mib:8.2f} MiB "
              f"(formula L(E^2+3E+2)x8 = {row['formula_bytes'] / 2**20:.2f} MiB + header), raw {gib:8.2f} GiB, "
              f"ratio 1:{row['raw_fp16_bytes_1M'] / row['stats_bytes']:,.0f}")

if __name__ == "__main__":
    main()
