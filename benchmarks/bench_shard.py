"""Replicated DDP (`--use-ddp`) against the FSDP2-sharded base (`--shard-base`), 2 ranks, side by side.

    python benchmarks/bench_shard.py --workdir /tmp/nexus-bench-shard [--nproc 2] [--steps 6] [--rounds 2]

A gpt-oss model in the released layout (MXFP4 experts, bf16 rest) with random weights, small enough
for a laptop but shaped like the real one: 16 decoder layers, 32 experts of 1024 × 1024, hidden 1024,
a 32,000-word vocabulary (≈ 1 GB on disk). Each round trains it once replicated and once sharded
(alternating, on the same data: online self-teacher, shared experts of width 0.25, --seq-len 128,
batch 1 per rank), every rank a torchrun worker of its own that reports:
- its step times (the first step, which sets things up, is left out; median of the rest),
- its peak resident memory (`ru_maxrss`),
- the bytes of the frozen base it holds (its shards when sharded; `nexus.sharding.local_nbytes`).

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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT.parent / "shared" / "reference" / "gpt-oss-20b"
sys.path.insert(0, str(ROOT / "src"))

MIB = 1024**2
VOCAB = 32_000
LAYERS = 16

WORKER = r"""
import json, resource, sys, time
import torch
from nexus.sharding import is_sharded
from nexus.train.config import TrainConfig
from nexus.train.recipe import Trainer
from nexus import dist
ckpt, data, out, mode, steps = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
cfg = TrainConfig(student_model=ckpt, init_strategy="random", width_multiplier=0.25, dataset=data, seq_len=128,
                  batch_size=1, max_steps=steps, output_dir=out, shard_base=mode == "sharded", device="cpu",
                  dtype="bfloat16", checkpoint_interval=10**6, logging_steps=10**6)
trainer = Trainer(cfg)
trainer.setup()
times = []
for _ in range(steps):
    t0 = time.perf_counter()
    row = trainer.train_step()
    times.append(time.perf_counter() - t0)
# after a step's backward, when the sharded root (embeddings, LM head) is back to its shards
base = sum((p.to_local() if is_sharded(p) else p).nbytes for p in trainer.model.parameters() if not p.requires_grad)
rank = dist.rank()
result = {"rank": rank, "step_s": times, "loss": row["loss"], "base_bytes": base,
          "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
with open(f"{out}/rank{rank}.json", "w") as f:
    json.dump(result, f)
trainer.cleanup()
"""


def write_model(ckpt: Path) -> None:
    """gpt-oss in the released layout, scaled down (random weights), and a word-level tokenizer."""
    from transformers import AutoConfig

    from nexus.convert.writer import (MXFP4_QUANTIZATION_CONFIG, gpt_oss_mxfp4_nbytes, random_gpt_oss_mxfp4_tensors,
                                      write_checkpoint)

    config = AutoConfig.from_pretrained(REFERENCE)
    config.update({"num_hidden_layers": LAYERS, "hidden_size": 1024, "intermediate_size": 1024,
                   "num_local_experts": 32, "num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": 64,
                   "vocab_size": VOCAB, "layer_types": config.layer_types[:LAYERS], "pad_token_id": 0, "eos_token_id": 1})
    tmp = ckpt.with_name(ckpt.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    write_checkpoint(tmp, config, random_gpt_oss_mxfp4_tensors(config), total_bytes=gpt_oss_mxfp4_nbytes(config),
                     num_shards=2, quantization_config=MXFP4_QUANTIZATION_CONFIG)
    tmp.rename(ckpt)


def write_data(work: Path, ckpt: Path) -> Path:
    """Standard-library source text as JSONL, and a word-level tokenizer over it (VOCAB words) beside the model."""
    import sysconfig

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    texts = [p.read_text(errors="replace") for p in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:100]]
    words = sorted({w for t in texts for w in t.split()})[: VOCAB - 3]
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                            unk_token="<unk>").save_pretrained(str(ckpt))
    data = work / "data.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return data


def run(work: Path, ckpt: Path, data: Path, mode: str, nproc: int, steps: int, name: str) -> list[dict]:
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    script = work / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", str(script),
           str(ckpt), str(data), str(out), mode, str(steps)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{name} failed:\n{r.stderr[-3000:]}")
    return [json.loads((out / f"rank{i}.json").read_text()) for i in range(nproc)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True, type=Path)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    ckpt = args.workdir / "model"
    if not ckpt.is_dir():
        write_model(ckpt)
    data = write_data(args.workdir, ckpt)
    results = {"replicated": [], "sharded": []}
    for r in range(args.rounds):
        for mode in ("replicated", "sharded") if r % 2 == 0 else ("sharded", "replicated"):
            results[mode].append(run(args.workdir, ckpt, data, mode, args.nproc, args.steps, f"{mode}-{r}"))
            print(f"round {r} {mode}: done", flush=True)
    checkpoint_bytes = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    (args.workdir / "results.json").write_text(json.dumps({"checkpoint_bytes": checkpoint_bytes, **results}, indent=1))
    print(report(results, checkpoint_bytes, args))


def report(results: dict, checkpoint_bytes: int, args) -> str:
    rows = {}
    for mode, rounds in results.items():
        steps = [t for ranks in rounds for rank in ranks for t in rank["step_s"][1:]]
        rows[mode] = {"step": statistics.median(steps),
                      "rss": max(rank["peak_rss_bytes"] for ranks in rounds for rank in ranks),
                      "base": max(rank["base_bytes"] for ranks in rounds for rank in ranks),
                      "loss": [ranks[0]["loss"] for ranks in rounds]}
    lines = [f"`python benchmarks/bench_shard.py --workdir DIR --nproc {args.nproc} --steps {args.steps} "
             f"--rounds {args.rounds}`: gpt-oss layout, {LAYERS} layers × 32 MXFP4 experts of 1024 × 1024, "
             f"checkpoint {checkpoint_bytes / MIB:.0f} MiB; {args.nproc} ranks (gloo, one thread each), online "
             f"self-teacher, width 0.25, --seq-len 128, batch 1 per rank; median step over "
             f"{args.rounds} × {args.nproc} ranks × {args.steps - 1} steps.", "",
             "| | step (s, median) | peak RSS per rank | frozen base held per rank | last loss (rank 0, per round) |",
             "|---|---:|---:|---:|---|"]
    for mode, flag in (("replicated", "--use-ddp"), ("sharded", "--shard-base")):
        r = rows[mode]
        lines.append(f"| {mode} (`{flag}`) | {r['step']:.2f} | {r['rss'] / MIB:.0f} MiB | {r['base'] / MIB:.0f} MiB | "
                     + ", ".join(f"{x:.4f}" for x in r["loss"]) + " |")
    ratio = rows["sharded"]["step"] / rows["replicated"]["step"]
    lines += ["", f"sharded / replicated: step time × {ratio:.2f}, base held × "
              f"{rows['sharded']['base'] / rows['replicated']['base']:.2f}, peak RSS × "
              f"{rows['sharded']['rss'] / rows['replicated']['rss']:.2f}"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
