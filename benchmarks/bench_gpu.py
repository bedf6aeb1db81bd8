"""Training throughput on one GPU with a quantized (MXFP4) base: gpt-oss-20b and gpt-oss-120b sizes.

    python benchmarks/bench_gpu.py                      # both sizes, on cuda (under 8 minutes on one H200)
    python benchmarks/bench_gpu.py --sizes tiny --device cpu   # a smoke run of the same code on a CPU

Each model is built directly in device memory with random weights in gpt-oss's real shapes (config
from shared/reference/gpt-oss-20b; 120b: 36 layers, 128 experts), its experts held as MXFP4 packed
bytes by NEXUS's quantized experts module (no checkpoint: the 120b one would not fit a small scratch
disk). Shared experts (--width) are attached and trained as `nexus train` does with the online
self-teacher: per step one no-grad teacher forward with the shared experts off, one student forward,
the loss (CE + KL at T = 1 over the full vocabulary), backward, AdamW. Gradient checkpointing is on.

Reported per size: tokens/s (median of the timed steps), peak device memory, and achieved model
TFLOP/s, counting 2·N_active FLOPs per token for each forward (teacher, student, the checkpointed
recompute) and 2·N_active for the backward's input gradients, + 6·N_shared for the trainable
weights; attention's quadratic term is left out (stated, so the figure is a lower bound).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT.parent / "shared" / "reference" / "gpt-oss-20b"
sys.path.insert(0, str(ROOT / "src"))

SIZES = {
    "20b": {},
    "120b": dict(num_hidden_layers=36, num_local_experts=128),
    "tiny": dict(num_hidden_layers=2, num_local_experts=8, hidden_size=256, intermediate_size=256,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=1024, pad_token_id=0,
                 eos_token_id=1),
}


def config_for(size: str):
    from transformers import AutoConfig

    cfg = json.loads((REFERENCE / "config.json").read_text())
    cfg.update(SIZES[size])
    layers = cfg["num_hidden_layers"]
    cfg["layer_types"] = (["sliding_attention", "full_attention"] * layers)[:layers]
    cfg.pop("quantization_config", None)
    return AutoConfig.for_model(cfg.pop("model_type"), **cfg)


def build(config, device):
    """A gpt-oss model with random weights made on `device`, its experts MXFP4-packed (never dequantized whole)."""
    import torch
    from torch import nn
    from transformers import AutoModelForCausalLM

    from nexus.base.loader import parameters_on_meta
    from nexus.base.quantized import MXFP4, quantize_experts
    from nexus.moe import find_moe_blocks

    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    for b in find_moe_blocks(model):
        quantize_experts(b.experts, MXFP4, device="meta")
    g = torch.Generator(device=device).manual_seed(0)
    for name, p in list(model.named_parameters()):
        t = torch.empty(p.shape, dtype=p.dtype, device=device)
        if name.endswith("_blocks"):
            t.random_(0, 256, generator=g)
        elif name.endswith("_scales"):
            t.random_(118, 124, generator=g)  # 2^-9 .. 2^-4: trained-like magnitudes
        elif "norm" in name:
            t.fill_(1)
        else:
            t.normal_(0, 0.02, generator=g)
        module_name, _, leaf = name.rpartition(".")
        model.get_submodule(module_name)._parameters[leaf] = nn.Parameter(t, requires_grad=False)
    return model.to(device)


def active_params(model, top_k: int) -> tuple[int, int]:
    """(N_active per token, N_shared): non-expert weights (not the embedding table) + top-k routed experts."""
    from nexus.moe import find_moe_blocks
    from nexus.shared import shared_expert_modules

    blocks = find_moe_blocks(model)
    shared = sum(p.numel() for s in shared_expert_modules(model).values() for p in s.parameters())
    routed = sum(p.numel() for b in blocks for p in b.experts.parameters())  # packed bytes and biases: not weights
    other = sum(p.numel() for p in model.parameters()) - routed - shared - model.get_input_embeddings().weight.numel()
    experts = sum(top_k * b.layout.expert_numel() for b in blocks)
    return other + experts + shared, shared


def bench(size: str, args) -> dict:
    import torch
    import torch.nn.functional as F

    from nexus.base.loader import packed_nbytes
    from nexus.shared import attach_shared_experts, shared_experts_disabled

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    config = config_for(size)
    model = build(config, device)
    attach_shared_experts(model, init="random", width_multiplier=args.width, seed=0)
    model.config.use_cache = False
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers' current name, as train uses
    if enable is not None:
        enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    build_s = time.perf_counter() - t0
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-5)
    n_active, n_shared = active_params(model, config.num_experts_per_tok)
    g = torch.Generator(device=device).manual_seed(1)
    times = []
    tokens = args.batch_size * args.seq_len
    for step in range(args.warmup + args.steps):
        ids = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len), device=device, generator=g)
        if cuda:
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        with torch.no_grad(), shared_experts_disabled(model):
            teacher = model(input_ids=ids).logits.float()
        logits = model(input_ids=ids).logits.float()
        ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        kl = F.kl_div(logits.log_softmax(-1).flatten(0, 1), teacher.log_softmax(-1).flatten(0, 1),
                      log_target=True, reduction="batchmean")
        del teacher
        (ce + kl).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - t)
        print(f"{size} step {step}: {time.perf_counter() - t:.2f} s, loss {float((ce + kl).detach()):.3f}", file=sys.stderr,
              flush=True)
    step_s = statistics.median(times)
    flops_per_token = 2 * n_active * 4 + 6 * n_shared  # teacher, student, recompute, input grads; shared weights
    result = {"size": size, "device": torch.cuda.get_device_name(device) if cuda else "cpu",
              "layers": config.num_hidden_layers, "experts": config.num_local_experts, "width": args.width,
              "batch_size": args.batch_size, "seq_len": args.seq_len, "build_s": round(build_s, 1),
              "packed_experts_gib": round(packed_nbytes(model) / 2**30, 2),
              "step_s_median": round(step_s, 3), "tokens_per_s": round(tokens / step_s, 1),
              "active_params": n_active, "shared_params": n_shared,
              "model_tflops_per_s": round(flops_per_token * tokens / step_s / 1e12, 2)}
    if cuda:
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    del model, opt
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=["20b", "120b"], choices=list(SIZES))
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--width", type=float, default=1.0, help="shared expert width multiplier (default 1)")
    p.add_argument("--steps", type=int, default=5, help="timed steps (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--output", type=Path, default=None, help="also write the results as JSON here")
    args = p.parse_args()
    results = [bench(size, args) for size in args.sizes]
    text = json.dumps(results, indent=2)
    if args.output:
        args.output.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
