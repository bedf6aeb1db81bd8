"""Pretrain NEXUS's bundled demo model: a tiny GPT-OSS MoE on the Python standard library.

    nice -n 5 python3 scripts/pretrain_demo.py            # writes src/nexus/assets/demo-model/

Corpus: the `.py` source (code and docstrings) of the running interpreter's standard library, read
from `sysconfig.get_paths()["stdlib"]` at run time and never copied into the repository; see
`nexus.demo_data` for which files count and how they split. Pretraining sees `general_train` only;
the held-out domain (`email` + `http`: `domain_train` / `domain_eval`) is left for NEXUS to
specialize on.

Steps, all deterministic for a given interpreter and thread count:
1. a byte-level BPE tokenizer (`--vocab-size` 4096) trained on general_train;
2. general_train packed into `--seq-len` 256 blocks (documents joined by <|endoftext|>);
3. a `GptOssForCausalLM` (4 layers, hidden 128, alternating sliding-64/full attention with sinks,
   32 clamped-SwiGLU experts with biases, top-4 routing; ~4.4M parameters, fp32 ~18 MB)
   trained with AdamW for `--steps` 1200 x `--batch-size` 16 x 256 tokens (~4.9M tokens), LM loss
   plus the load-balancing aux loss (`--aux-coef`) so the routers do not collapse;
4. LM loss / perplexity on general_eval and domain_eval, router statistics on both;
5. model, tokenizer (with a chat template), generation config, `pretraining.json` and the model
   card README.md written atomically to `--out`.

Runs on one thread by default (`--threads`): about 20 minutes on an idle 2-core machine, leaving
the other core free; bit-for-bit reproducible on the same machine and thread count.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import time
from collections import deque
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "src"), str(Path(__file__).resolve().parent)]
from demo_card import render_card  # noqa: E402  (scripts/demo_card.py)
from nexus import demo_data  # noqa: E402
from nexus.fsutil import atomic_dir  # noqa: E402

PAD, BOS, EOS = "<|pad|>", "<|startoftext|>", "<|endoftext|>"
ROLES = ("system", "user", "assistant")
END = "<|end|>"  # closes one chat message
SPECIAL = [PAD, BOS, EOS, END] + [f"<|{r}|>" for r in ROLES]
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role: ' + m['role']) }}{% endif %}"
    "{{ '<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
WARMUP_STEPS = 50  # linear warmup, then cosine decay to MIN_LR_RATIO x peak
MIN_LR_RATIO = 0.1
FINAL_LOSS_WINDOW = 50  # "final train loss" = mean LM loss over the last this-many steps
UNDERUSED_LOAD = 0.1  # an expert getting < 10% of the even share of routed assignments


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=REPO / "src/nexus/assets/demo-model")
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--learning-rate", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--aux-coef", type=float, default=0.1, help="router_aux_loss_coef (load balancing)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--log-every", type=int, default=25)
    return p.parse_args(argv)


def model_config(args, tokenizer):
    """The demo architecture; every size the rest of the script uses is read back from this."""
    from transformers import GptOssConfig

    return GptOssConfig(
        vocab_size=len(tokenizer), hidden_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, attention_bias=True,
        sliding_window=64, layer_types=["sliding_attention", "full_attention"] * 2,
        num_local_experts=32, num_experts_per_tok=4, intermediate_size=64,
        max_position_embeddings=args.seq_len, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        router_aux_loss_coef=args.aux_coef, tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE (GPT-2 style pre-tokenization) wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS,
                                   additional_special_tokens=SPECIAL[3:], model_max_length=None)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def pack(texts: list[str], tokenizer, seq_len: int, offset: int = 0) -> torch.Tensor:
    """All texts as one stream (each followed by EOS) cut into blocks: (n_blocks, seq_len) int64."""
    stream = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
        stream.append(tokenizer.eos_token_id)
    stream = torch.tensor(stream[offset:], dtype=torch.long)
    n = stream.numel() // seq_len
    return stream[: n * seq_len].view(n, seq_len)


def lr_at(step: int, total: int, peak: float) -> float:
    """Linear warmup over WARMUP_STEPS, then cosine decay from `peak` to MIN_LR_RATIO x peak."""
    if step < WARMUP_STEPS:
        return peak * (step + 1) / WARMUP_STEPS
    progress = (step - WARMUP_STEPS) / max(1, total - WARMUP_STEPS)
    return peak * (MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * progress)))


def lm_and_aux(model, input_ids: torch.Tensor, balance=None):
    """Next-token LM loss and the raw load-balancing aux loss (not yet times its coefficient): the model's
    own, or `balance(model output)`."""
    out = model(input_ids=input_ids, output_router_logits=True, use_cache=False)
    logits = out.logits[:, :-1]  # (B, T-1, V)
    lm = F.cross_entropy(logits.reshape(-1, logits.size(-1)), input_ids[:, 1:].reshape(-1))
    return lm, out.aux_loss if balance is None else balance(out)


def train(model, texts, tokenizer, args, balance=None) -> tuple[list[dict], float]:
    """AdamW on packed general_train blocks; a fresh shuffle and packing offset every epoch.

    The loss is LM + router_aux_loss_coef × the balancing loss (`lm_and_aux`'s `balance`). Returns the
    periodic log and the final train LM loss (mean over the last FINAL_LOSS_WINDOW steps).
    """
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]  # biases, norms, sinks
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.learning_rate, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(args.seed)
    coef = model.config.router_aux_loss_coef
    order, blocks, epoch, cursor = None, None, 0, 0
    log, window, last, t0 = [], [], deque(maxlen=FINAL_LOSS_WINDOW), time.time()
    model.train()
    for step in range(args.steps):
        if order is None or cursor + args.batch_size > len(order):
            # Shifting the packing by a random offset each epoch gives the model new block boundaries.
            offset = 0 if epoch == 0 else int(torch.randint(args.seq_len, (1,), generator=gen))
            blocks = pack(texts, tokenizer, args.seq_len, offset)
            order, cursor, epoch = torch.randperm(len(blocks), generator=gen), 0, epoch + 1
        batch = blocks[order[cursor: cursor + args.batch_size]]  # (B, T)
        cursor += args.batch_size
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.learning_rate)
        lm, aux = lm_and_aux(model, batch, balance)
        (lm + coef * aux).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        window.append((lm.item(), aux.item(), grad_norm.item()))
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            elapsed = time.time() - t0
            tok_s = (step + 1) * batch.numel() / elapsed
            lm_m, aux_m, gn = (sum(v) / len(window) for v in zip(*window))
            entry = {"step": step + 1, "epoch": epoch, "lm_loss": round(lm_m, 4), "aux_loss": round(aux_m, 4),
                     "grad_norm": round(gn, 3), "lr": opt.param_groups[0]["lr"], "tokens_per_s": round(tok_s, 1)}
            log.append(entry)
            eta = (args.steps - step - 1) * batch.numel() / tok_s
            print(f"step {step + 1}/{args.steps} epoch {epoch} lm {lm_m:.4f} aux {aux_m:.4f} "
                  f"lr {entry['lr']:.2e} | {tok_s:.0f} tok/s, eta {eta / 60:.1f} min", flush=True)
            window = []
        last.append(lm.item())
    return log, sum(last) / len(last)


@torch.no_grad()
def evaluate(model, blocks: torch.Tensor, batch_size: int) -> dict:
    """LM loss over `blocks` (B, T) and per-layer router statistics (top-4 share, entropy)."""
    model.eval()
    cfg = model.config
    num_experts, top_k = cfg.num_local_experts, cfg.num_experts_per_tok
    nll, n_pred = 0.0, 0
    counts = torch.zeros(cfg.num_hidden_layers, num_experts, dtype=torch.float64)
    entropy = torch.zeros(cfg.num_hidden_layers, dtype=torch.float64)
    n_routed = 0
    for i in range(0, len(blocks), batch_size):
        x = blocks[i: i + batch_size]
        out = model(input_ids=x, output_router_logits=True, use_cache=False)
        logits = out.logits[:, :-1]
        nll += F.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1), reduction="sum").item()
        n_pred += x[:, 1:].numel()
        for layer, router_logits in enumerate(out.router_logits):  # raw router logits, (B*T, E)
            logp = router_logits.double().log_softmax(-1)
            entropy[layer] += -(logp.exp() * logp).sum()
            idx = router_logits.topk(top_k, dim=-1).indices  # (B*T, k): the routed experts
            counts[layer] += torch.bincount(idx.reshape(-1), minlength=num_experts).double()
        n_routed += x.numel()
    loss = nll / n_pred
    layers = {}
    for layer in range(cfg.num_hidden_layers):
        share = counts[layer].sort(descending=True).values
        layers[str(layer)] = {
            "top4_share": round((share[:4].sum() / share.sum()).item(), 4),
            "router_entropy": round((entropy[layer] / n_routed).item(), 4),
            "max_entropy": round(math.log(num_experts), 4),
            # an expert's share of assignments relative to even routing (1.0 = even)
            "max_load": round((share[0] / share.sum() * num_experts).item(), 3),
            "min_load": round((share[-1] / share.sum() * num_experts).item(), 3),
            "underused_experts": int((share / share.sum() * num_experts < UNDERUSED_LOAD).sum()),
        }
    return {"tokens": n_pred, "loss": round(loss, 4), "perplexity": round(math.exp(loss), 3), "layers": layers}


def hardware() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_avg_1min_at_start": load, "torch": torch.__version__}


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    import transformers
    from transformers import GenerationConfig, GptOssForCausalLM

    started, hw = time.time(), hardware()
    corpus = demo_data.describe_corpus()
    print(f"corpus: Python {corpus['python_version']} stdlib at {corpus['stdlib_path']}; "
          + ", ".join(f"{k} {v['files']} files / {v['bytes'] / 1e6:.2f} MB" for k, v in corpus["splits"].items()))
    texts = demo_data.stdlib_texts("general_train")

    t = time.time()
    tokenizer = train_tokenizer(texts, args.vocab_size)
    tokenizer_s = time.time() - t
    n_train_tokens = pack(texts, tokenizer, 1).numel()
    print(f"tokenizer: {len(tokenizer)} tokens in {tokenizer_s:.0f}s; general_train = {n_train_tokens:,} tokens "
          f"({corpus['splits']['general_train']['bytes'] / n_train_tokens:.2f} bytes/token)")

    config = model_config(args, tokenizer)
    model = GptOssForCausalLM(config)  # weights from the family's own init, seeded above
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters, experts implementation "
          f"{model.config._experts_implementation}; training {args.steps} steps x {args.batch_size} x {args.seq_len}")

    t, cpu = time.time(), time.process_time()
    log, final_loss = train(model, texts, tokenizer, args)
    train_s, train_cpu_s = time.time() - t, time.process_time() - cpu

    t = time.time()
    evals = {split: evaluate(model, pack(demo_data.stdlib_texts(split), tokenizer, args.seq_len), args.batch_size)
             for split in ("general_eval", "domain_eval")}
    eval_s = time.time() - t
    for split, ev in evals.items():
        print(f"{split}: loss {ev['loss']:.4f}, perplexity {ev['perplexity']:.2f} over {ev['tokens']:,} tokens")

    model.config.output_router_logits = False  # inference default; the aux loss is a training concern
    report = {
        "format": "nexus-demo-pretraining", "version": 1,
        "command": "python3 scripts/pretrain_demo.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"},
        "corpus": corpus, "hardware": hw, "transformers": transformers.__version__,
        "parameters": n_params, "train_tokens_per_epoch": n_train_tokens,
        "tokens_seen": args.steps * args.batch_size * args.seq_len,
        "final_train_lm_loss": round(final_loss, 4), "final_loss_window": FINAL_LOSS_WINDOW,
        "eval": evals, "log": log,
        "seconds": {"tokenizer": round(tokenizer_s, 1), "train": round(train_s, 1),
                    "train_cpu": round(train_cpu_s, 1), "eval": round(eval_s, 1),
                    "total": round(time.time() - started, 1)},
    }
    with atomic_dir(args.out, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        GenerationConfig(bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(END)],
                         max_new_tokens=128).save_pretrained(tmp)
        weights = tmp / "model.safetensors"
        report["weights_bytes"] = weights.stat().st_size
        report["weights_sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
        report["seconds"]["total"] = round(time.time() - started, 1)
        (tmp / "pretraining.json").write_text(json.dumps(report, indent=1) + "\n")
        (tmp / "README.md").write_text(render_card(report, config))
        tmp.chmod(0o755)  # a temporary directory starts private; the package data must be readable
        for f in tmp.iterdir():
            f.chmod(0o644)
    print(f"wrote {args.out}: {report['weights_bytes'] / 1e6:.1f} MB weights, final train LM loss {final_loss:.4f}, "
          f"general_eval ppl {evals['general_eval']['perplexity']}, domain_eval ppl {evals['domain_eval']['perplexity']}, "
          f"{report['seconds']['total'] / 60:.1f} min total")
    return 0


if __name__ == "__main__":
    sys.exit(main())
