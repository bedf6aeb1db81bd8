"""Step time of NEXUS training vs PEFT LoRA, online vs offline distillation, and teacher-cache size.

    PYTHONPATH=src python benchmarks/bench_train.py                # defaults below; ~2-4 min on 2 CPU cores
    PYTHONPATH=src python benchmarks/bench_train.py --device cuda --seq-len 512 --batch-size 8

The LoRA modes need PEFT (`pip install -e '.[bench]'`).

One small random Qwen3-MoE model (sizes in MODEL below) and one synthetic dataset serve every mode:

    nexus-distill    nexus train, CE + KL against the student's own base (online teacher)
    nexus-ce         nexus train with --kl-weight 0 (no teacher forward)
    nexus-offline    nexus train --precomputed-teacher (k = 64)
    lora-ce          PEFT LoRA on attention (q/k/v/o) + experts (`target_parameters`), CE
    lora-distill     the same LoRA, CE + KL against the base (`disable_adapter()` as the teacher)

LoRA's rank is chosen so its trainable-parameter count is closest to NEXUS's. Every mode runs the
same batches (batch × seq-len tokens, packed) with AdamW. Modes are interleaved step by step (rotating
order) so that load changes on a shared machine hit all alike; the median step time over the timed
steps is reported (the first --warmup steps are not timed). Cache bytes per token are measured from the
shard files `nexus precompute-teacher` writes for k = 16, 64, 128.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

MODEL = dict(vocab_size=1024, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             head_dim=32, intermediate_size=256, moe_intermediate_size=64, num_experts=8, num_experts_per_tok=2,
             max_position_embeddings=1024, pad_token_id=0, eos_token_id=1, bos_token_id=2, norm_topk_prob=True)
WORDS = 1000


def build_model_dir(root: Path) -> tuple[Path, Path]:
    """A random model + word-level tokenizer of WORDS words, and a synthetic jsonl dataset."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen3_moe", **MODEL), dtype=torch.float32)
    model.save_pretrained(root / "model")
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, **{f"w{i}": i + 4 for i in range(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                            unk_token="<unk>").save_pretrained(root / "model")
    rng = random.Random(0)
    with open(root / "data.jsonl", "w") as f:  # Zipf-like word frequencies: something to learn
        for _ in range(400):
            words = [f"w{min(WORDS - 1, int(rng.paretovariate(1.2)) - 1)}" for _ in range(rng.randint(50, 300))]
            f.write(json.dumps({"text": " ".join(words)}) + "\n")
    return root / "model", root / "data.jsonl"


def nexus_runner(model_dir, data, out, args, **kw):
    """A started Trainer; calling the returned function runs one timed training step."""
    from nexus.train.config import TrainConfig
    from nexus.train.recipe import Trainer

    cfg = TrainConfig(student_model=str(model_dir), dataset=str(data), output_dir=str(out), init_strategy="random",
                      seq_len=args.seq_len, batch_size=args.batch_size, max_steps=args.warmup + args.steps,
                      learning_rate=1e-3, checkpoint_interval=10 ** 9, logging_steps=10 ** 9, device=args.device, **kw)
    trainer = Trainer(cfg)
    trainer.setup()

    def step() -> float:
        t0 = time.perf_counter()
        trainer.train_step()
        return time.perf_counter() - t0

    return step, trainer


def lora_model(model_dir, rank: int, device):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                     target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    model = get_peft_model(base, cfg)
    return model, sum(p.numel() for p in model.parameters() if p.requires_grad)


def lora_runner(model_dir, data, args, rank: int, distill: bool):
    """PEFT LoRA training on the same stream of batches; calling the result runs one timed step."""
    from nexus.data import load_tokenizer
    from nexus.stream import DataSpec, SequenceStream, StepLayout, build_sequences

    model, _ = lora_model(model_dir, rank, args.device)
    model.train()
    stream = SequenceStream(build_sequences(DataSpec(str(data), seq_len=args.seq_len), load_tokenizer(model_dir)))
    layout = StepLayout(args.batch_size)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    counter = iter(range(10 ** 9))

    def step() -> float:
        t0 = time.perf_counter()
        ids, _ = stream.batch(layout.positions(next(counter), 0, 0))
        ids = ids.to(args.device)
        if distill:
            with torch.no_grad(), model.disable_adapter():
                teacher = model(input_ids=ids).logits[:, :-1].float()
        logits = model(input_ids=ids).logits[:, :-1].float()
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        if distill:
            t = 2.0
            loss = loss + t * t * F.kl_div(F.log_softmax(logits / t, -1), F.log_softmax(teacher / t, -1),
                                           log_target=True, reduction="none").sum(-1).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if args.device != "cpu":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    return step


def cache_bytes_per_token(model_dir, data, root: Path, args, k: int) -> tuple[float, int]:
    from nexus.teacher.cache import bytes_per_token
    from nexus.teacher.precompute import PrecomputeConfig, precompute

    out = root / f"cache-k{k}"
    with contextlib.redirect_stdout(io.StringIO()):
        precompute(PrecomputeConfig(model=str(model_dir), dataset=str(data), output=str(out), num_sequences=16,
                                    seq_len=args.seq_len, top_k=k, device=args.device))
    measured = sum(p.stat().st_size for p in out.glob("shard-*.safetensors")) / (16 * args.seq_len)
    return measured, bytes_per_token(k)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="timed steps per mode")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads on CPU")
    p.add_argument("--output", help="write the results as JSON here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir, data = build_model_dir(root)
        from nexus.teacher.precompute import PrecomputeConfig, precompute

        with contextlib.redirect_stdout(io.StringIO()):
            precompute(PrecomputeConfig(model=str(model_dir), dataset=str(data), output=str(root / "cache"),
                                        num_steps=args.warmup + args.steps, batch_size=args.batch_size,
                                        seq_len=args.seq_len, top_k=64, device=args.device))
        runners, trainers = {}, []
        for mode, kw in (("nexus-distill", {}), ("nexus-ce", {"kl_weight": 0.0}),
                         ("nexus-offline", {"precomputed_teacher": str(root / "cache")})):
            runners[mode], trainer = nexus_runner(model_dir, data, root / mode, args, **kw)
            trainers.append(trainer)
        nexus_params = trainers[0].params.numel()
        per_rank = lora_model(model_dir, 2, "cpu")[1] - lora_model(model_dir, 1, "cpu")[1]
        rank = max(1, round(nexus_params / per_rank))
        lora_params = lora_model(model_dir, rank, "cpu")[1]
        runners["lora-ce"] = lora_runner(model_dir, data, args, rank, distill=False)
        runners["lora-distill"] = lora_runner(model_dir, data, args, rank, distill=True)
        # Interleaved (rotating order), so a change in machine load hits every mode alike.
        results = {mode: [] for mode in runners}
        modes = list(runners)
        for i in range(args.warmup + args.steps):
            for mode in modes[i % len(modes):] + modes[:i % len(modes)]:
                elapsed = runners[mode]()
                if i >= args.warmup:
                    results[mode].append(elapsed)
        for trainer in trainers:
            trainer.cleanup()
        sizes = {k: cache_bytes_per_token(model_dir, data, root, args, k) for k in (16, 64, 128)}

    print(f"\nmodel: qwen3_moe {MODEL}\ndevice {args.device}, threads {args.threads}, batch {args.batch_size} × "
          f"seq {args.seq_len}, {args.steps} timed steps after {args.warmup}")
    print(f"trainable parameters: NEXUS {nexus_params:,}; LoRA r={rank} {lora_params:,}\n")
    print("| mode | trainable params | median step (ms) | tokens/s |\n|---|---:|---:|---:|")
    summary = {}
    for mode, times in results.items():
        med = statistics.median(times)
        params = nexus_params if mode.startswith("nexus") else lora_params
        summary[mode] = {"median_step_s": med, "trainable_params": params}
        print(f"| {mode} | {params:,} | {med * 1e3:.1f} | {args.batch_size * args.seq_len / med:,.0f} |")
    print("\n| top-k | bytes/token (k × 6 + 5) | measured bytes/token |\n|---:|---:|---:|")
    for k, (measured, formula) in sizes.items():
        print(f"| {k} | {formula} | {measured:.1f} |")
    if args.output:
        Path(args.output).write_text(json.dumps({"args": vars(args), "model": MODEL, "lora_rank": rank,
                                                 "results": summary, "cache": sizes}, indent=2))


if __name__ == "__main__":
    main()
