"""The verbs on a full-size gpt-oss-20b checkpoint (random weights, the real layout) on a small machine.

    python benchmarks/bench_scale.py --workdir /tmp/nexus-bench-scale      # ~14 GB of disk; reuses the checkpoint

1. Writes gpt-oss-20b as released (config, shard index and tensor names from shared/reference/gpt-oss-20b:
   MXFP4 experts as `_blocks`/`_scales`, bf16 elsewhere, 13.8 GB) with random weights, once, plus a
   word-level tokenizer over the benchmark text (gpt-oss's own tokenizer is not in the reference files;
   the vocabulary is the model's, 201,088, so every id is valid). Data: Python standard-library sources.
2. Runs each verb as a user would, one subprocess each, and reads that child's peak RSS from `os.wait4`:
   collect (256 tokens), analyze, convert with its sanity check (pca_top4, width 0.25), train (2 steps,
   --seq-len 128, online self-teacher, shared experts of width 0.25), validate (perplexity, adapter and
   base). The base stays MXFP4 (NEXUS's loader); nothing is dequantized beyond one chunk of experts.
3. Loads the same checkpoint with transformers' dequantizing `from_pretrained` (bf16) for comparison,
   stopped once it passes --dequantized-cap GiB resident (a 24 GiB machine cannot hold its 42 GB).
4. Measures MXFP4 and FP8 decode throughput against a plain memory copy, side by side on one core, and
   one gpt-oss-20b experts module's forward + backward with the decode and products as they were and
   are (`--decode-only`: just this, no checkpoint).

Prints a markdown section for docs/benchmarks.md and writes results.json in --workdir.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT.parent / "shared" / "reference" / "gpt-oss-20b"
sys.path.insert(0, str(ROOT / "src"))

GIB = 1024**3
TOKENS_COLLECT = 256


def write_checkpoint(ckpt: Path) -> None:
    """The full-size gpt-oss-20b layout with random weights, streamed (memory for one tensor)."""
    from transformers import AutoConfig

    from nexus.convert.writer import (MXFP4_QUANTIZATION_CONFIG, gpt_oss_mxfp4_nbytes, random_gpt_oss_mxfp4_tensors,
                                      write_checkpoint as write)

    config = AutoConfig.from_pretrained(REFERENCE)
    reference_index = json.loads((REFERENCE / "model.safetensors.index.json").read_text())
    tmp = ckpt.with_name(ckpt.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp, config, random_gpt_oss_mxfp4_tensors(config), total_bytes=gpt_oss_mxfp4_nbytes(config),
          num_shards=len(set(reference_index["weight_map"].values())), quantization_config=MXFP4_QUANTIZATION_CONFIG)
    ours = json.loads((tmp / "model.safetensors.index.json").read_text())["weight_map"]
    if set(ours) != set(reference_index["weight_map"]):
        raise SystemExit("generated tensor names differ from the released gpt-oss-20b index")
    for f in ("config.json", "generation_config.json"):
        shutil.copy(REFERENCE / f, tmp / f)  # the released config itself (quantization_config included)
    tmp.rename(ckpt)


def write_data(work: Path, ckpt: Path) -> Path:
    """Standard-library source text as JSONL, and a word-level tokenizer over it saved beside the model."""
    import sysconfig

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    texts = []
    for name in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:200]:
        texts.append(name.read_text(errors="replace"))
    words = sorted({w for t in texts for w in t.split()})[:100_000]
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    fast.save_pretrained(str(ckpt))
    data = work / "data.jsonl"
    with open(data, "w") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    return data


def run(name: str, cmd: list[str], log: Path, cap_gib: float | None = None) -> dict:
    """Run a command (output to `log`); its wall time and peak RSS (os.wait4). With `cap_gib`, stop it past that."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    t0 = time.perf_counter()
    capped = False
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if cap_gib is not None and not capped:
                try:
                    with open(f"/proc/{proc.pid}/status") as st:
                        rss = int(next(line for line in st if line.startswith("VmRSS")).split()[1]) * 1024
                except (OSError, StopIteration, ValueError):
                    rss = 0
                if rss > cap_gib * GIB:
                    proc.kill()
                    capped = True
            time.sleep(0.2)
    wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    result = {"name": name, "seconds": round(wall, 1), "peak_rss_gib": round(usage.ru_maxrss * 1024 / GIB, 2),
              "exit": code, "capped": capped, "cmd": " ".join(map(str, cmd)), "log": str(log)}
    print(f"{name}: {result}", file=sys.stderr, flush=True)
    if code != 0 and not capped:
        print(log.read_text()[-4000:], file=sys.stderr)
    return result


def nexus(*args) -> list[str]:
    return [sys.executable, "-m", "nexus", *map(str, args)]


def decode_throughput(repeats: int = 7) -> dict:
    """GB/s of one core, medians of interleaved runs: a plain copy into an existing tensor against the decode
    (bf16 and fp32 out) into an existing buffer, as QuantizedGroupedLinear decodes chunk after chunk, into a
    fresh tensor, and without the native kernel (no C compiler: numpy for MXFP4, torch ops for FP8).
    MXFP4: four gpt-oss experts' gate_up rows; FP8: four DeepSeek-V3 experts' gate_proj (2048 x 7168)."""
    import torch

    from nexus.base import fp8, mxfp4, native

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (4, 2880, 90, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(118, 124, (4, 2880, 90), dtype=torch.uint8, generator=g)  # as in the release
    weight, scale_inv = fp8.encode(torch.randn(4, 2048, 7168, generator=g) * 0.02)
    codecs = {"mxfp4": (lambda dtype, out=None: mxfp4.decode(blocks, scales, dtype, out=out),
                        blocks.numel() + scales.numel(), blocks.numel() * 2),
              "fp8": (lambda dtype, out=None: fp8.decode(weight, scale_inv, fp8.BLOCK_SIZE, dtype, out=out),
                      weight.numel() + scale_inv.numel() * 4, weight.numel())}
    kernel = native.library()
    if kernel is None:
        print("no native decode kernels (no C compiler?): both decode columns are the fallback", file=sys.stderr)

    def fallback(decode, dtype):
        native._STATE["lib"] = None
        try:
            return decode(dtype)
        finally:
            native._STATE["lib"] = kernel

    result = {"native": kernel is not None}
    for codec, (decode, packed, values) in codecs.items():
        for dtype in (torch.bfloat16, torch.float32):
            src = torch.ones(values, dtype=dtype)
            dst, buf = torch.empty_like(src), torch.empty_like(src)
            fns = {"copy": lambda dst=dst, src=src: dst.copy_(src),
                   "decode_buffer": lambda dtype=dtype, buf=buf: decode(dtype, out=buf),
                   "decode_fresh": lambda dtype=dtype: decode(dtype),
                   "fallback_fresh": lambda dtype=dtype: fallback(decode, dtype)}
            times = {k: [] for k in fns}
            for f in fns.values():
                f()  # warm up (and build the kernels)
            for _ in range(repeats):  # interleaved, so every variant sees the same machine load
                for k, f in fns.items():
                    t = time.perf_counter()
                    f()
                    times[k].append(time.perf_counter() - t)
            med = {k: statistics.median(v) for k, v in times.items()}
            out_bytes = values * dtype.itemsize
            result[f"{codec} {str(dtype).removeprefix('torch.')}"] = {
                "copy_gb_s": out_bytes / med["copy"] / 1e9,
                **{f"{k}_out_gb_s": out_bytes / med[k] / 1e9 for k in fns if k != "copy"},
                **{f"{k}_packed_gb_s": packed / med[k] / 1e9 for k in fns if k != "copy"},
                **{f"{k}_ratio": med["copy"] / med[k] for k in fns if k != "copy"}}
    return result


def layer_step(repeats: int = 3) -> dict:
    """Seconds for forward + backward of one gpt-oss-20b MoE experts module kept MXFP4 (32 experts, 2880 x
    2880, 128 tokens x top-4: every expert decoded twice), on one core, interleaved: fp32 activations with
    the decode as it was (numpy table lookup, a fresh tensor per chunk) and as it is (native kernel into
    the reused chunk buffer); bf16 activations with fp32 products and with bf16 products (the default
    where the CPU has a fast bf16 GEMM, `nexus.base.cpu_matmul.fp32_products`)."""
    import torch
    from transformers import AutoConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    from nexus.base import cpu_matmul, native, quantized

    torch.set_num_threads(1)
    config = AutoConfig.from_pretrained(REFERENCE)
    with torch.device("meta"):
        experts = GptOssExperts(config)
    experts = quantized.quantize_experts(experts, quantized.MXFP4).to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    for name, p in experts.named_parameters():
        if name.endswith("_blocks"):
            p.data.copy_(torch.randint(0, 256, p.shape, dtype=torch.uint8, generator=g))
        elif name.endswith("_scales"):
            p.data.copy_(torch.randint(118, 124, p.shape, dtype=torch.uint8, generator=g))
        else:
            p.data.zero_()
    tokens, k = 128, config.num_experts_per_tok
    x = torch.randn(tokens, config.hidden_size, generator=g)
    index = torch.stack([torch.randperm(experts.num_experts, generator=g)[:k] for _ in range(tokens)])
    weights = torch.full((tokens, k), 1.0 / k)
    kernel, workspace, fast = native.library(), quantized._workspace, cpu_matmul._fast_cpu_gemm
    variants = {"fp32_before": (torch.float32, False, None), "fp32_after": (torch.float32, True, None),
                "bf16_fp32_products": (torch.bfloat16, True, False), "bf16_after": (torch.bfloat16, True, None)}

    def step(dtype, new, fast_gemm):
        native._STATE["lib"] = kernel if new else None
        quantized._workspace = workspace if new else (lambda *a: None)
        cpu_matmul._fast_cpu_gemm = fast if fast_gemm is None else (lambda d: fast_gemm)
        try:
            xi = x.to(dtype).requires_grad_(True)
            t = time.perf_counter()
            experts(xi, index, weights.to(dtype)).float().square().mean().backward()
            return time.perf_counter() - t
        finally:
            native._STATE["lib"], quantized._workspace, cpu_matmul._fast_cpu_gemm = kernel, workspace, fast

    for v in variants.values():
        step(*v)  # warm up
    times = {name: [] for name in variants}
    for _ in range(repeats):
        for name, v in variants.items():
            times[name].append(step(*v))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {**{f"{k}_s": v for k, v in med.items()}, "native": kernel is not None,
            "bf16_products": not cpu_matmul.fp32_products(torch.bfloat16, "cpu")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--dequantized-cap", type=float, default=20.0, help="GiB at which the dequantized load is stopped")
    p.add_argument("--skip", nargs="*", default=[], help="steps to skip (collect convert train validate dequantized)")
    p.add_argument("--decode-only", action="store_true", help="only the decode measurement (no checkpoint written)")
    args = p.parse_args()
    if args.decode_only:
        d = decode_throughput()
        d["layer"] = layer_step()
        print(json.dumps(d, indent=2), file=sys.stderr)
        print(decode_report(d))
        return
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / "gpt-oss-20b"
    if not ckpt.is_dir():
        t = time.perf_counter()
        write_checkpoint(ckpt)
        print(f"wrote {ckpt} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    data = write_data(work, ckpt)
    results = {"checkpoint_gb": sum(f.stat().st_size for f in ckpt.glob("*.safetensors")) / 1e9}
    results["decode"] = decode_throughput()
    results["decode"]["layer"] = layer_step()
    print(f"decode: {results['decode']}", file=sys.stderr)
    steps = results["steps"] = []
    if "collect" not in args.skip:
        steps.append(run("collect", log=work / "collect.log", cmd=nexus(
            "collect", "--model", ckpt, "--dataset", data, "--target-tokens", TOKENS_COLLECT, "--seq-len", 128,
            "--batch-size", 2, "--device", "cpu", "--output", work / "stats.safetensors", "--overwrite")))
        steps[-1]["tokens"] = TOKENS_COLLECT
        run("analyze", log=work / "analyze.log", cmd=nexus(
            "analyze", "--input", work / "stats.safetensors", "--output", work / "pca.json", "--top-k", 4,
            "--overwrite"))
    if "convert" not in args.skip:
        steps.append(run("convert", log=work / "convert.log", cmd=nexus(
            "convert", "--input", ckpt, "--pca-stats", work / "pca.json", "--init-strategy", "pca_top4",
            "--width-multiplier", 0.25, "--output", work / "adapter", "--overwrite")))
    if "train" not in args.skip:
        shutil.rmtree(work / "run", ignore_errors=True)
        steps.append(run("train", log=work / "train.log", cmd=nexus(
            "train", "--student-model", work / "adapter", "--dataset", data, "--seq-len", 128, "--batch-size", 1,
            "--max-steps", 2, "--logging-steps", 1, "--device", "cpu", "--output-dir", work / "run")))
        metrics = [json.loads(line) for line in open(work / "run" / "metrics.jsonl")] \
            if (work / "run" / "metrics.jsonl").is_file() else []
        steps[-1]["tokens_per_s"] = [m.get("tokens_per_s") for m in metrics]
        steps[-1]["tokens"] = 2 * 128
    if "validate" not in args.skip:
        steps.append(run("validate", log=work / "validate.log", cmd=nexus(
            "validate", "--model", work / "run" / "final", "--dataset", f"stdlib={data}", "--compute-perplexity",
            "--seq-len", 128, "--num-samples", 2, "--device", "cpu", "--output", work / "validation",
            "--overwrite")))
        steps[-1]["tokens"] = 2 * 128
    if "dequantized" not in args.skip:
        code = ("import torch; from transformers import AutoModelForCausalLM, Mxfp4Config; "
                f"AutoModelForCausalLM.from_pretrained({str(ckpt)!r}, dtype=torch.bfloat16, "
                "quantization_config=Mxfp4Config(dequantize=True))")
        steps.append(run("transformers dequantized load (bf16)", [sys.executable, "-c", code],
                         log=work / "dequantized.log", cap_gib=args.dequantized_cap))
    for s in steps:
        if s.get("tokens") and s["exit"] == 0:
            s["tokens_per_s_wall"] = round(s["tokens"] / s["seconds"], 2)
    (work / "results.json").write_text(json.dumps(results, indent=2))
    print(report(results, args))


def report(results: dict, args) -> str:
    d = results["decode"]
    lines = [f"Checkpoint: gpt-oss-20b layout, random weights, {results['checkpoint_gb']:.1f} GB on disk.", "",
             "| step | exit | wall s | peak RSS GiB | tokens/s (wall) |", "|---|---|---|---|---|"]
    for s in results["steps"]:
        rss = f"> {args.dequantized_cap:g} (stopped)" if s["capped"] else f"{s['peak_rss_gib']}"
        lines.append(f"| {s['name']} | {s['exit']} | {s['seconds']} | {rss} | {s.get('tokens_per_s_wall', '')} |")
    lines += ["", decode_report(d)]
    return "\n".join(lines)


def decode_report(d: dict) -> str:
    lines = [f"Decode on one core, medians of interleaved runs (native kernels: {'yes' if d['native'] else 'no'}):",
             "", "| codec, out | copy GB/s | decode into a buffer: out GB/s (packed in) | of the copy | fresh tensor: "
             "out GB/s | no compiler, fresh: out GB/s |", "|---|---:|---:|---:|---:|---:|"]
    for name, r in d.items():
        if isinstance(r, dict) and "copy_gb_s" in r:
            lines.append(f"| {name} | {r['copy_gb_s']:.2f} | {r['decode_buffer_out_gb_s']:.2f} "
                         f"({r['decode_buffer_packed_gb_s']:.2f}) | {100 * r['decode_buffer_ratio']:.0f} % | "
                         f"{r['decode_fresh_out_gb_s']:.2f} | {r['fallback_fresh_out_gb_s']:.2f} |")
    if "layer" in d:
        r = d["layer"]
        lines += ["", "One gpt-oss-20b experts module kept MXFP4, forward + backward of 128 tokens (top-4, all 32 "
                  f"experts decoded twice), one core, medians: fp32 activations {r['fp32_before_s']:.2f} s with the "
                  f"numpy decode into fresh tensors, {r['fp32_after_s']:.2f} s with the native kernel into the reused "
                  f"chunk buffer; bf16 activations {r['bf16_fp32_products_s']:.2f} s with fp32 products, "
                  f"{r['bf16_after_s']:.2f} s as NEXUS now runs them on this CPU (bf16 products: "
                  f"{'yes' if r['bf16_products'] else 'no'})."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
