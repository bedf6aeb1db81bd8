"""Pretrain NEXUS's study testbed: a small GPT-OSS MoE whose experts specialize by domain.

    nice -n 5 python3 scripts/pretrain_testbed.py --out /tmp/nexus-testbed

Corpus (scripts/testbed_data.py, read from this machine, never copied into the repository): Python
standard-library sources, C headers, Perl modules (the general domains, ~3 MB each) and English man
pages (the held-out domain: ~3% of the pretraining bytes in `domain_pretrain`, so the model knows it
a little, plus `domain_train` left for NEXUS and `domain_eval`).

Steps, all deterministic for a given machine (its installed files, its CPU: vendor and instruction set pick
torch's and MKL's kernels), torch build and thread count:
1. a byte-level BPE tokenizer (`--vocab-size` 8192) trained on the pretraining texts;
2. pretraining texts packed into `--seq-len` 256 blocks (documents joined by <|endoftext|>),
   blocks shuffled across domains, reshuffled and re-packed at a new offset every epoch;
3. a `GptOssForCausalLM` (4 layers, hidden 128, 32 experts top-4, as the demo model) trained with
   AdamW; LM loss plus a small Switch load-balancing loss taken in every layer (`--balance per-layer`,
   `--aux-coef` 0.02; the demo uses transformers' gpt_oss aux loss, which pools the counts of all layers
   and so lets single layers keep dead experts). The balancing loss is computed over whole
   mixed-domain batches: it keeps every expert of every layer in use while leaving each domain free
   to prefer its own experts;
4. the routing measure of scripts/testbed_routing.py (TV distance and top-8 overlap between the
   held-out domain and general text, least-used expert, perplexity per domain);
5. model, tokenizer (with the demo's chat template), generation config, `pretraining.json`,
   `corpus.json` (the corpus manifest) and the model card README.md written atomically to `--out`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch

SCRIPTS = Path(__file__).resolve().parent
REPO = SCRIPTS.parent
sys.path[:0] = [str(REPO / "src"), str(SCRIPTS)]
import testbed_data  # noqa: E402
import testbed_routing  # noqa: E402
from nexus.fsutil import atomic_dir  # noqa: E402
from pretrain_demo import END, FINAL_LOSS_WINDOW, hardware, pack, train, train_tokenizer  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("/tmp/nexus-testbed"))
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--learning-rate", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--aux-coef", type=float, default=0.02, help="load-balancing aux loss coefficient")
    p.add_argument("--balance", choices=("per-layer", "pooled"), default="per-layer",
                   help="per-layer: Switch loss in every layer over the whole batch, averaged over layers; "
                        "pooled: transformers' gpt_oss aux loss (counts pooled over layers, as the demo)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--card", type=Path, default=None, metavar="MODEL_DIR",
                   help="only re-render MODEL_DIR/README.md from its pretraining.json, then exit")
    p.add_argument("--write-splits", type=Path, default=None,
                   help="also write every split as JSONL here (domain_train.jsonl is NEXUS's training data)")
    return p.parse_args(argv)


def model_config(args, tokenizer):
    from transformers import GptOssConfig

    heads = max(1, args.hidden_size // 32)
    return GptOssConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden_size, num_hidden_layers=args.layers,
        num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), head_dim=32, attention_bias=True,
        sliding_window=64, layer_types=["sliding_attention", "full_attention"] * (args.layers // 2)
        + ["sliding_attention"] * (args.layers % 2),
        num_local_experts=args.experts, num_experts_per_tok=args.top_k, intermediate_size=64,
        max_position_embeddings=args.seq_len, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        router_aux_loss_coef=args.aux_coef, tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def per_layer_balance(router_logits, top_k: int) -> torch.Tensor:
    """Switch-Transformer balancing loss in each layer, averaged over layers (1.0 = perfectly even).

    Per layer: E * sum_e f_e * P_e over all tokens of the batch, with f_e the expert's share of the
    top-k assignments and P_e its mean router probability. Being taken over whole mixed-domain
    batches, it keeps every expert of every layer in use without asking any one domain to spread out.
    """
    total = 0.0
    for logits in router_logits:  # (tokens, E)
        E = logits.size(-1)
        probs = logits.float().softmax(-1)
        idx = logits.topk(top_k, dim=-1).indices
        f = torch.zeros(E, dtype=torch.float32).scatter_add_(0, idx.reshape(-1), torch.ones(idx.numel()))
        f = f / idx.numel()
        total = total + E * (f * probs.mean(0)).sum()
    return total / len(router_logits)


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def render_card(report: dict, config) -> str:
    """The testbed's model card; every figure comes from `report` (pretraining.json)."""
    corpus, a, sec, hw, r = report["corpus"], report["args"], report["seconds"], report["hardware"], report["routing"]
    lines = [
        "---", "library_name: transformers", "pipeline_tag: text-generation",
        "tags: [gpt_oss, mixture-of-experts, nexus-testbed]", "---", "",
        "# NEXUS testbed: a small GPT-OSS MoE whose experts specialize by domain", "",
        "A study model for NEXUS, pretrained by `scripts/pretrain_testbed.py` on four kinds of text found on "
        "any Debian-like machine. Its routers concentrate by domain, so a NEXUS shared expert trained on the "
        "held-out domain (`man`) meets experts that already specialize. Every figure below was written by the "
        "run (`pretraining.json`, `corpus.json` beside this card).", "",
        "## Corpus", "",
        f"Python {corpus['python_version']} standard library (`python`), C headers under /usr/include (`c`), "
        "Perl modules (`perl`) and English man pages, gunzipped roff (`man`, the held-out domain). Files are "
        f"ordered by the sha256 of `domain:path`, truncated to {corpus['file_cap']:,} bytes at a line end, and "
        "dealt into splits up to fixed byte caps (scripts/testbed_data.py). Corpus sha256 "
        f"`{corpus['sha256'][:16]}…`.", "",
        "| domain | candidate files | split | files | bytes |", "|---|---|---|---|---|"]
    for d, info in corpus["domains"].items():
        for split, s in info["splits"].items():
            lines.append(f"| `{d}` | {info['candidate_files']:,} | `{split}` | {s['files']} | {_mb(s['bytes'])} |")
    lines += ["", "Source packages (Debian versions, `dpkg-query -W`; files used per package):", ""]
    for d, info in corpus["domains"].items():
        if d == "python":
            lines.append(f"- `python`: CPython {info['python_version']} standard library")
        else:
            pk = ", ".join(f"{p} {v['version'] or '?'} ({v['files']})" for p, v in info.get("packages", {}).items())
            lines.append(f"- `{d}`: {pk}")
    pre = corpus["splits"]["domain_pretrain"]["bytes"]
    total = pre + corpus["splits"]["general_train"]["bytes"]
    lines += [
        "", f"**Pretraining** saw `general_train` and `domain_pretrain` only: the held-out domain is "
        f"{pre / total:.1%} of the pretraining bytes (under-represented, as the domain a NEXUS adapter "
        "targets usually is). `domain_train` (man pages disjoint from every other split) is left for NEXUS; "
        "`domain_eval` and `general_eval` were never trained on, nor was `general_val` (dealt last, from the "
        "general files left over; outside the corpus sha256).", "",
        "## Architecture and training", "",
        f"`GptOssForCausalLM`, {report['parameters'] / 1e6:.2f}M parameters ({_mb(report['weights_bytes'])} fp32, "
        f"sha256 `{report['weights_sha256'][:16]}…`): {config.num_hidden_layers} layers "
        f"(`{'`, `'.join(config.layer_types)}`), hidden {config.hidden_size}, {config.num_attention_heads} query / "
        f"{config.num_key_value_heads} key-value heads of {config.head_dim}, sliding window {config.sliding_window}, "
        f"{config.num_local_experts} experts top-{config.num_experts_per_tok} (intermediate {config.intermediate_size}), "
        f"vocabulary {config.vocab_size} (byte-level BPE trained on the pretraining texts, "
        f"{report['bytes_per_token']:.2f} bytes/token; chat template and special tokens as the demo model's).", "",
        f"- {a['steps']} steps x {a['batch_size']} x {a['seq_len']} = {report['tokens_seen']:,} tokens "
        f"({report['tokens_seen'] / report['train_tokens_per_epoch']:.2f} epochs)",
        f"- AdamW (0.9/0.95, weight decay {a['weight_decay']}), peak lr {a['learning_rate']}, warmup then cosine, "
        f"clip 1.0, seed {a['seed']}; LM loss + {a['aux_coef']} x load-balancing loss "
        + ("(Switch loss in each layer over the whole mixed-domain batch, averaged over layers: it keeps every "
           "expert of every layer in use while leaving each domain free to prefer its own experts)"
           if a.get("balance") == "per-layer" else "(transformers' gpt_oss aux loss, pooled over layers)"),
        f"- final train LM loss {report['final_train_lm_loss']:.4f} (mean of the last {FINAL_LOSS_WINDOW} steps)",
        f"- time: {sec['train'] / 60:.1f} min training ({sec['train_cpu'] / 60:.1f} min CPU), {sec['total'] / 60:.1f} "
        f"min in all, on {hw['torch_threads']} thread of a {hw['cpu_count']}-core {hw['cpu']} (load at start "
        f"{hw['load_avg_1min_at_start']:.1f}); torch {hw['torch']}, transformers {report['transformers']}; "
        f"finished {report['finished']}", "",
        "## Routing by domain", "",
        "Measured by `scripts/testbed_routing.py` (the same command measures any model):", "",
        "```bash", f"PYTHONPATH=src python scripts/testbed_routing.py {report['out']}", "```", "",
        testbed_routing.render(r), "",
        "*TV distance*: total-variation distance between the held-out domain's and general text's routing "
        "distributions (each expert's mean share of the top-k assignments); *top-8 overlap*: how many of the "
        "domain's 8 most-used experts are among general text's 8; *least-used share*: the rarest expert's share "
        "of all eval assignments (no expert is dead when it is above 0).", "",
        "## Reproduce", "", "```bash", f"nice -n 5 {report['command']}".rstrip(), "```", "",
        "Deterministic for a given machine (its installed files are the corpus: same Python and Debian package "
        "versions give the same corpus sha256; its CPU, vendor and instruction set, picks torch's and MKL's "
        "kernels, so an AMD AVX2, an AMD AVX-512 and an Intel AVX-512 machine give three different sets of "
        "weights), torch build and thread count.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.card:
        from transformers import AutoConfig

        report = json.loads((args.card / "pretraining.json").read_text())
        (args.card / "README.md").write_text(render_card(report, AutoConfig.from_pretrained(args.card)))
        print(f"wrote {args.card / 'README.md'}")
        return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    import transformers
    from transformers import GenerationConfig, GptOssForCausalLM

    started, hw = time.time(), hardware()
    corpus = testbed_data.build_corpus()
    manifest = corpus["manifest"]
    print("corpus: " + ", ".join(f"{k} {v['files']} files / {_mb(v['bytes'])}" for k, v in manifest["splits"].items()))
    if args.write_splits:
        testbed_data.write_splits(corpus, args.write_splits)
        print(f"wrote splits to {args.write_splits}")
    texts = [t for _, _, t in corpus["texts"]["general_train"] + corpus["texts"]["domain_pretrain"]]

    t = time.time()
    tokenizer = train_tokenizer(texts, args.vocab_size)
    tokenizer_s = time.time() - t
    n_train_tokens = pack(texts, tokenizer, 1).numel()
    n_bytes = sum(len(x.encode("utf-8")) for x in texts)
    print(f"tokenizer: {len(tokenizer)} tokens in {tokenizer_s:.0f}s; pretraining text = {n_train_tokens:,} tokens "
          f"({n_bytes / n_train_tokens:.2f} bytes/token)")

    config = model_config(args, tokenizer)
    model = GptOssForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters; training {args.steps} steps x {args.batch_size} x {args.seq_len}")

    t, cpu = time.time(), time.process_time()
    k = model.config.num_experts_per_tok
    balance = (lambda out: per_layer_balance(out.router_logits, k)) if args.balance == "per-layer" else None
    log, final_loss = train(model, texts, tokenizer, args, balance)  # loss: LM + --aux-coef × balance
    train_s, train_cpu_s = time.time() - t, time.process_time() - cpu

    t = time.time()
    routing = testbed_routing.measure(model, tokenizer, "testbed", args.seq_len, args.batch_size)
    eval_s = time.time() - t
    print(testbed_routing.render(routing))

    model.config.output_router_logits = False
    report = {
        "format": "nexus-testbed-pretraining", "version": 1,
        "command": "python3 scripts/pretrain_testbed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "out": str(args.out),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("out", "write_splits", "card")},
        "corpus": manifest, "hardware": hw, "transformers": transformers.__version__,
        "parameters": n_params, "train_tokens_per_epoch": n_train_tokens, "bytes_per_token": n_bytes / n_train_tokens,
        "tokens_seen": args.steps * args.batch_size * args.seq_len,
        "final_train_lm_loss": round(final_loss, 4), "routing": routing, "log": log,
        "seconds": {"tokenizer": round(tokenizer_s, 1), "train": round(train_s, 1), "train_cpu": round(train_cpu_s, 1),
                    "eval": round(eval_s, 1)},
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
        report["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        (tmp / "pretraining.json").write_text(json.dumps(report, indent=1) + "\n")
        (tmp / "corpus.json").write_text(json.dumps(manifest, indent=1) + "\n")
        (tmp / "README.md").write_text(render_card(report, config))
        tmp.chmod(0o755)
        for f in tmp.iterdir():
            f.chmod(0o644)
    print(f"wrote {args.out}: mean TV {routing['mean_tv']:.3f}, mean top-8 overlap {routing['mean_top_overlap']:.2f}, "
          f"least-used share {routing['min_share_all']:.4f}, general ppl {routing['general_eval']['perplexity']:.2f}, "
          f"{routing['held_out']} ppl {routing['sets'][routing['held_out']]['perplexity']:.2f}, "
          f"{report['seconds']['total'] / 60:.1f} min total")
    return 0


if __name__ == "__main__":
    sys.exit(main())
