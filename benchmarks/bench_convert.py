"""Benchmark `nexus convert` against loading the same model with transformers: peak memory, throughput.

    python benchmarks/bench_convert.py --workdir /tmp/nexus-bench-convert

1. Writes a ~1 GB checkpoint in gpt-oss's released layout (MXFP4 experts as `_blocks`/`_scales`, bf16
   rest, sharded, index, quantization_config) with gpt-oss's real expert sizes (hidden = intermediate
   = 2880), so per-expert and per-layer costs are those of gpt-oss-20b/120b; only the number of
   layers and experts, and the vocabulary, are smaller.
2. Runs, each in its own subprocess, and reads that child's peak RSS from `os.wait4` (ru_maxrss of
   the child, as `getrusage(RUSAGE_CHILDREN)` would report it for that child alone):
   - runtime: Python + torch + transformers imported and the meta model built (convert's constant);
   - convert: `nexus convert --init-strategy pca_topK --skip-check` (page cache of the shards dropped
     first with posix_fadvise, so expert bytes come from disk);
   - transformers: `from_pretrained` of the checkpoint (MXFP4 dequantized to bf16 on CPU, as the
     original tool's conversion had to).
3. Prints a markdown section with the figures and the extrapolation to gpt-oss-120b.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

GB = 1e9
SHARD_GB = 0.4  # shard size of the generated checkpoint
# gpt-oss-120b (public config): what the extrapolation scales to
GPT_OSS_120B = dict(num_hidden_layers=36, num_local_experts=128, hidden_size=2880, intermediate_size=2880,
                    num_attention_heads=64, num_key_value_heads=8, head_dim=64, vocab_size=201088,
                    experts_per_token=4, num_experts_per_tok=4)


def bench_config(layers: int, experts: int, vocab: int):
    from transformers import AutoConfig

    return AutoConfig.for_model(
        "gpt_oss", num_hidden_layers=layers, num_local_experts=experts, hidden_size=2880, intermediate_size=2880,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=vocab, num_experts_per_tok=4,
        layer_types=["sliding_attention", "full_attention"] * (layers // 2) + ["sliding_attention"] * (layers % 2))


def generate(directory: Path, layers: int, experts: int, vocab: int, shard_gb: float) -> None:
    """Random MXFP4 experts (scales around 2^-5, like trained weights) and bf16 rest, streamed to shards."""
    import torch

    from nexus.convert.checkpoint import meta_model
    from nexus.convert.writer import MXFP4_QUANTIZATION_CONFIG, write_checkpoint

    config = bench_config(layers, experts, vocab)
    model = meta_model(config)
    g = torch.Generator().manual_seed(0)

    def tensors():
        for name, p in model.state_dict().items():
            stem, _, leaf = name.rpartition(".")
            if stem.endswith(".experts") and leaf in ("gate_up_proj", "down_proj"):
                e, n_in, n_out = p.shape  # parameter [E, in, out]; stored [E, out, in/32, 16]
                yield f"{name}_blocks", torch.randint(0, 256, (e, n_out, n_in // 32, 16), dtype=torch.uint8, generator=g)
                yield f"{name}_scales", torch.randint(119, 124, (e, n_out, n_in // 32), dtype=torch.uint8, generator=g)
            else:
                yield name, (torch.randn(p.shape, generator=g) * 0.02).to(torch.bfloat16)

    write_checkpoint(directory, config, tensors(), max_shard_bytes=int(shard_gb * GB),
                     quantization_config=MXFP4_QUANTIZATION_CONFIG)


def drop_page_cache(directory: Path) -> None:
    """Evict this checkpoint's pages from the page cache (only these files; no root needed)."""
    for f in directory.glob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def child(mode: str, args, ckpt: Path, out: Path, stats: Path) -> None:
    import torch

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if mode == "generate":
        generate(ckpt, args.layers, args.experts, args.vocab, shard_gb=SHARD_GB)
        result = {}
    elif mode == "runtime":
        from nexus.base.config import load_model_config
        from nexus.convert.checkpoint import meta_model

        meta_model(load_model_config(ckpt))
        result = {}
    elif mode == "convert":
        from nexus.convert.core import convert

        summary = convert(ckpt, out, args.strategy, pca_stats=stats, check=False, overwrite=True,
                          log=lambda m: print(m, file=sys.stderr, flush=True))
        result = {k: summary[k] for k in ("bytes_read", "experts_read", "layer_seconds", "seconds", "adapter_bytes")}
    else:
        from transformers import AutoModelForCausalLM, Mxfp4Config

        model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16,
                                                     quantization_config=Mxfp4Config(dequantize=True))
        result = {"params": sum(p.numel() for p in model.parameters())}
    result["wall_s"] = time.perf_counter() - t0
    print(json.dumps(result))


def measure(mode: str, args, stats: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--workdir", str(args.workdir), "--top-k", str(args.top_k),
           "--threads", str(args.threads), "--strategy", args.strategy, "--layers", str(args.layers),
           "--experts", str(args.experts), "--vocab", str(args.vocab)]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env, text=True)
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} child failed with exit code {proc.returncode}")
    result = json.loads(stdout.strip().splitlines()[-1])
    result["peak_rss"] = usage.ru_maxrss * 1024  # KiB on Linux
    return result


def params_of(config_kwargs) -> int:
    from transformers import AutoConfig

    from nexus.convert.checkpoint import meta_model

    model = meta_model(AutoConfig.for_model("gpt_oss", **config_kwargs))
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=Path("/tmp/nexus-bench-convert"))
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--top-k", type=int, default=12, help="experts merged per layer (pca_topK)")
    p.add_argument("--strategy", default=None, help="default pca_top{--top-k}")
    p.add_argument("--threads", type=int, default=1, help="torch threads in each child (shared machines: 1)")
    p.add_argument("--child", choices=["generate", "runtime", "convert", "load"], help=argparse.SUPPRESS)
    args = p.parse_args()
    args.strategy = args.strategy or f"pca_top{args.top_k}"
    ckpt, out, stats = args.workdir / "gpt-oss-mxfp4", args.workdir / "adapter", args.workdir / "pca_stats.json"
    if args.child:
        child(args.child, args, ckpt, out, stats)
        return

    # The parent stays small (no torch until the measurements are done): a child's ru_maxrss also
    # counts the pages it shared with the parent between fork and exec.
    if not (ckpt / "model.safetensors.index.json").is_file():
        print(f"generated {ckpt} in {measure('generate', args, stats)['wall_s']:.0f} s", file=sys.stderr)
    k = args.top_k
    weights = [round(1 / k, 6)] * (k - 1) + [round(1 - round(1 / k, 6) * (k - 1), 6)]
    stats.write_text(json.dumps({"format": "nexus-pca-stats", "version": 1, "num_experts": args.experts, "layers": {
        str(i): {"selected_experts": list(range(k)), "weights": weights} for i in range(args.layers)}}))
    ckpt_bytes = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))

    runtime = measure("runtime", args, stats)
    drop_page_cache(ckpt)
    conv = measure("convert", args, stats)
    drop_page_cache(ckpt)
    load = measure("load", args, stats)

    load_avg = os.getloadavg()[0]
    import torch

    from nexus.convert.checkpoint import ExpertReader
    import scipy

    from nexus.convert.assignment import linear_assignment
    from nexus.convert.merge import match_units, to_units, unit_features

    torch.set_num_threads(args.threads)
    reader = ExpertReader(ckpt)
    expert_bytes = reader.expert_nbytes(reader.layers[0])  # same sizes as gpt-oss-120b's experts
    layout = reader.blocks[reader.layers[0]].layout
    anchor = to_units(reader.read_expert(reader.layers[0], 0), layout)
    # aligned_topK: one I×I assignment per expert after the first: the unit-similarity matrix, then the
    # assignment (SciPy's solver, as convert uses it).
    sim_s, scipy_s = [], []
    for j in (1, 2):
        other = to_units(reader.read_expert(reader.layers[0], j), layout)
        t = time.perf_counter()
        cost = -(unit_features(anchor) @ unit_features(other).T)
        sim_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        perm = linear_assignment(cost)
        scipy_s.append(time.perf_counter() - t)
        assert (match_units(anchor, other).numpy() == perm).all()
    sim_s, scipy_s = (statistics.median(x) for x in (sim_s, scipy_s))
    align_s = sim_s + scipy_s
    solver = f"SciPy {scipy.__version__} `linear_sum_assignment`"
    big_params = params_of(GPT_OSS_120B)
    big_read = GPT_OSS_120B["num_hidden_layers"] * 24 * expert_bytes  # pca_top24
    rate = conv["bytes_read"] / conv["layer_seconds"]
    load_per_param = (load["peak_rss"] - runtime["peak_rss"]) / load["params"]  # beyond the runtime
    cmd = "python benchmarks/bench_convert.py --workdir " + str(args.workdir) + (
        f" --top-k {k}" if k != 12 else "") + (f" --threads {args.threads}" if args.threads != 1 else "")
    print(f"""## convert

Command: `{cmd}` (torch threads per child: {args.threads}; {os.cpu_count()} CPU cores, shared: load average
{load_avg:.1f} at the end of the run, so times are pessimistic).

Checkpoint: gpt-oss layout, MXFP4 experts with gpt-oss's real expert size (hidden = intermediate = 2880,
{expert_bytes / 1e6:.2f} MB per expert on disk), {args.layers} layers × {args.experts} experts, vocabulary
{args.vocab}: {ckpt_bytes / GB:.2f} GB in {len(list(ckpt.glob('*.safetensors')))} shards, {load['params'] / 1e9:.2f} B parameters.
Each run in its own subprocess; peak RSS is that child's ru_maxrss (os.wait4).

| run | peak RSS | wall time |
|---|---|---|
| runtime only (python + torch + transformers, meta model) | {runtime['peak_rss'] / GB:.2f} GB | {runtime['wall_s']:.1f} s |
| `nexus convert --init-strategy {args.strategy} --skip-check` | {conv['peak_rss'] / GB:.2f} GB | {conv['wall_s']:.1f} s |
| transformers `from_pretrained` (MXFP4 dequantized to bf16) | {load['peak_rss'] / GB:.2f} GB | {load['wall_s']:.1f} s |

convert read {conv['experts_read']} experts, {conv['bytes_read'] / GB:.3f} GB of expert bytes (page cache dropped before
the run), in {conv['layer_seconds']:.1f} s of per-layer work (read + MXFP4 decode + merge + checks):
**{rate / GB:.3f} GB/s** ({conv['experts_read'] / conv['layer_seconds']:.2f} experts/s); adapter {conv['adapter_bytes'] / 1e6:.0f} MB.
convert's memory above the runtime: {(conv['peak_rss'] - runtime['peak_rss']) / GB:.2f} GB — one layer's merge
(accumulator + the expert being read, in fp32), which does not depend on the number of layers or experts.

### Extrapolation to gpt-oss-120b (pca_top24)

- Experts read: 36 layers × 24 = 864 experts × {expert_bytes / 1e6:.2f} MB = **{big_read / GB:.1f} GB**
  (of ~{36 * 128 * expert_bytes / GB:.0f} GB of experts); at {rate / GB:.3f} GB/s: **{big_read / rate / 60:.0f} min**
  plus ~{runtime['wall_s']:.0f} s start-up.
- `aligned_top24` adds one {layout.intermediate_size}×{layout.intermediate_size} assignment per expert after the first (medians of 2, on random
  weights): the unit-similarity matrix {sim_s:.2f} s, the assignment {scipy_s:.2f} s with {solver};
  36 × 23 of them ≈ **{36 * 23 * align_s / 60:.0f} min** more.
- convert's peak memory: the per-layer working set is the same as here (same expert size), so
  ≈ **{conv['peak_rss'] / GB:.1f} GB** (+ the adapter's 36 layers are streamed to disk, not held).
- Loading with transformers as the original tool did: at least {big_params / 1e9:.1f} B parameters × 2 bytes (bf16)
  = **{big_params * 2 / GB:.0f} GB**; extrapolating this run's peak linearly ({runtime['peak_rss'] / GB:.1f} GB runtime +
  {load_per_param:.2f} bytes per parameter beyond it) gives {(runtime['peak_rss'] + big_params * load_per_param) / GB:.0f} GB
  (an upper estimate: part of the overhead is per-tensor dequantization scratch that need not grow with the model).
""")


if __name__ == "__main__":
    main()
