"""The demo model's card (README.md), rendered from the `pretraining.json` report of one run.

Every figure comes from the report; nothing here is typed by hand. Used by `pretrain_demo.py`;
re-render an existing card with

    python3 scripts/demo_card.py src/nexus/assets/demo-model
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def _router_rows(report: dict, num_experts: int) -> list[str]:
    gen, dom = report["eval"]["general_eval"]["layers"], report["eval"]["domain_eval"]["layers"]
    rows = ["| layer | attention | top-4 share | router entropy (nats) | max load | under-used experts | "
            "domain_eval top-4 share | domain_eval entropy |",
            "|---|---|---|---|---|---|---|---|"]
    for layer, g in gen.items():
        d = dom[layer]
        rows.append(f"| {layer} | {report['layer_types'][int(layer)].split('_')[0]} | {g['top4_share']:.3f} | "
                    f"{g['router_entropy']:.3f} | {g['max_load']:.2f} | {g['underused_experts']} of {num_experts} | "
                    f"{d['top4_share']:.3f} | {d['router_entropy']:.3f} |")
    return rows


def _router_summary(report: dict, num_experts: int, top_k: int) -> str:
    layers = report["eval"]["general_eval"]["layers"].values()
    aux = report["log"][-1]["aux_loss"]
    text = f"The load-balancing aux loss ended at {aux:.3f} (it equals {top_k} for perfectly even routing)"
    even_share = 4 / num_experts
    if min(g["top4_share"] for g in layers) > 2 * even_share:
        text += (f"; the top-{top_k} choices are skewed in every layer (top-4 share "
                 f"{min(g['top4_share'] for g in layers):.2f}–{max(g['top4_share'] for g in layers):.2f} "
                 f"against {even_share:.3f} for even routing)")
    underused = sum(g["underused_experts"] for g in layers)
    if underused:
        text += f", and {underused} experts across the {len(layers)} layers are rarely chosen"
    return text + "."


def _domain_gap(ev: dict) -> str:
    gap = ev["domain_eval"]["loss"] - ev["general_eval"]["loss"]
    if gap > 0:
        return (f"The held-out domain is harder by {gap:.3f} nats/token (perplexity x"
                f"{math.exp(gap):.2f}): that gap is what a NEXUS shared expert trained on `domain_train` "
                "should close.")
    return f"The held-out domain is *not* harder than general text here ({gap:+.3f} nats/token)."


def render_card(report: dict, config) -> str:
    """Markdown model card for the run in `report`; `config` is the saved model's config."""
    corpus, sec, ev = report["corpus"], report["seconds"], report["eval"]
    a, hw = report["args"], report["hardware"]
    E, k, V = config.num_local_experts, config.num_experts_per_tok, config.vocab_size
    report = dict(report, layer_types=list(config.layer_types))
    split_rows = [f"| `{name}` | {s['files']} | {_mb(s['bytes'])} |" for name, s in corpus["splits"].items()]
    epochs = report["tokens_seen"] / report["train_tokens_per_epoch"]
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags: [gpt_oss, mixture-of-experts, nexus-demo]",
        "---",
        "",
        "# NEXUS demo model: a tiny GPT-OSS MoE pretrained on the Python standard library",
        "",
        "The bundled base model of `nexus demo`: small enough to ship inside the package and to run on a "
        "laptop CPU, built like GPT-OSS so every NEXUS stage runs on it as it would on gpt-oss-20b/120b. "
        "It was pretrained by `scripts/pretrain_demo.py`; every figure below was written by that run "
        "(`pretraining.json` beside this card holds them all, with the loss log).",
        "",
        "## Corpus",
        "",
        f"The `.py` source files (code and docstrings) of the standard library of CPython "
        f"{corpus['python_version']}, read at training time from `sysconfig.get_paths()[\"stdlib\"]` "
        f"(`{corpus['stdlib_path']}` on the training machine); the text is not copied into the repository. "
        f"Skipped, because not every CPython install has them or because they are generated tables: "
        f"{', '.join(f'`{x}`' for x in corpus['excluded'])}. "
        f"Splits are decided by `nexus.demo_data`: within the general part, and within each domain "
        f"package, files are ordered by the sha256 of their relative path and the first ones holding "
        f"{corpus['general_eval_fraction']:.0%} (general) / {corpus['domain_eval_fraction']:.0%} (domain) "
        f"of the bytes form the eval splits.",
        "",
        "| split | files | bytes |",
        "|---|---|---|",
        *split_rows,
        "",
        f"**Held-out domain:** {', '.join(f'`{p}`' for p in corpus['domain_packages'])} — never seen in "
        f"pretraining (tokenizer included), kept for NEXUS to specialize on. Pretraining used `general_train` "
        f"only.",
        "",
        "## Architecture",
        "",
        f"`GptOssForCausalLM` ({report['parameters'] / 1e6:.2f}M parameters, stored as fp32 safetensors, "
        f"{_mb(report['weights_bytes'])}, sha256 `{report['weights_sha256'][:16]}…`):",
        "",
        "| | |",
        "|---|---|",
        f"| layers | {config.num_hidden_layers} (`{'`, `'.join(config.layer_types)}`) |",
        f"| hidden size | {config.hidden_size} |",
        f"| attention | {config.num_attention_heads} query heads, {config.num_key_value_heads} key/value heads, "
        f"head dim {config.head_dim}, learned sinks, sliding window {config.sliding_window} |",
        f"| experts | {E} per layer, top-{k} routing, intermediate size {config.intermediate_size}, "
        f"clamped SwiGLU (alpha {config.swiglu_alpha}, limit {config.swiglu_limit}) with biases |",
        f"| position | RoPE `{config.rope_parameters['rope_type']}`, theta "
        f"{config.rope_parameters['rope_theta']}, trained context {a['seq_len']} tokens |",
        f"| vocabulary | {V}, embeddings untied |",
        "",
        "## Tokenizer",
        "",
        f"Byte-level BPE ({V} tokens, GPT-2 style pre-tokenization) trained on `general_train` with the "
        f"`tokenizers` library; {report['train_tokens_per_epoch']:,} tokens for general_train "
        f"({corpus['splits']['general_train']['bytes'] / report['train_tokens_per_epoch']:.2f} bytes/token). "
        "Special tokens: `<|pad|>`, `<|startoftext|>` (bos), `<|endoftext|>` (eos, also the document "
        "separator in pretraining), and the chat markers `<|system|>`, `<|user|>`, `<|assistant|>`, "
        "`<|end|>`. The chat template renders each message as `<|role|>\\ncontent<|end|>\\n` and the "
        "generation prompt as `<|assistant|>\\n`; generation stops at `<|end|>` or `<|endoftext|>`. "
        "Pretraining saw no chat data, so the markers are untrained until a fine-tune uses them.",
        "",
        "## Training",
        "",
        f"- {a['steps']} steps x {a['batch_size']} sequences x {a['seq_len']} tokens = "
        f"{report['tokens_seen']:,} tokens ({epochs:.2f} epochs of general_train; each epoch reshuffled and "
        f"re-packed at a new offset)",
        f"- AdamW (betas 0.9/0.95, weight decay {a['weight_decay']} on matrices), peak learning rate "
        f"{a['learning_rate']}, linear warmup then cosine decay, gradient clipping at 1.0, seed {a['seed']}",
        f"- loss: next-token LM loss + {a['aux_coef']} x load-balancing aux loss (router_aux_loss_coef), "
        "so that the routers spread tokens instead of collapsing onto a few experts",
        f"- time: {sec['train'] / 60:.1f} min training, {sec['total'] / 60:.1f} min in all (tokenizer "
        f"{sec['tokenizer']:.0f} s, evaluation {sec['eval']:.0f} s) on {hw['torch_threads']} thread(s) of a "
        f"{hw['cpu_count']}-core {hw['cpu']}, torch {hw['torch']}, transformers {report['transformers']}. "
        f"Training used {sec['train_cpu'] / 60:.1f} min of process CPU time; a wall time well above that "
        f"means the machine was shared (1-minute load average at start: {hw['load_avg_1min_at_start']:.1f})",
        "",
        "## Results",
        "",
        "LM loss is the mean next-token cross-entropy (nats/token) without the aux loss; "
        f"uniform guessing would be ln({V}) = {math.log(V):.3f}.",
        "",
        "| | LM loss | perplexity | tokens |",
        "|---|---|---|---|",
        f"| train (mean of the last {report['final_loss_window']} steps) | "
        f"{report['final_train_lm_loss']:.4f} | {math.exp(report['final_train_lm_loss']):.2f} | |",
        *(f"| `{s}` | {ev[s]['loss']:.4f} | {ev[s]['perplexity']:.2f} | {ev[s]['tokens']:,} |"
          for s in ("general_eval", "domain_eval")),
        "",
        _domain_gap(ev),
        "",
        "## Routers",
        "",
        f"Measured on the `general_eval` tokens (and `domain_eval`, for comparison). *Top-4 share*: fraction "
        f"of the routed top-{k} assignments that go to the layer's 4 most-used experts (even routing gives "
        f"4/{E} = {4 / E:.3f}). *Router entropy*: mean entropy of the softmax over all {E} experts of the "
        f"router logits (the uniform maximum is ln({E}) = {math.log(E):.3f}). *Max load*: the busiest "
        f"expert's share of assignments relative to even routing (1.00 = even); *under-used*: experts "
        f"below 0.1 of the even share. {_router_summary(report, E, k)}",
        "",
        *_router_rows(report, E),
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "from nexus.demo_data import DEMO_MODEL_DIR  # this directory, inside the installed package",
        "",
        "model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR)",
        "tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)",
        'ids = tokenizer("def read_file(path):\\n", return_tensors="pt").input_ids',
        "print(tokenizer.decode(model.generate(ids, max_new_tokens=40)[0]))",
        "```",
        "",
        "## Reproduce",
        "",
        "```bash",
        f"nice -n 5 {report['command']}".rstrip(),
        "```",
        "",
        "Deterministic for a given interpreter (its stdlib is the corpus), torch build and thread count; "
        "another Python version gives a different corpus and so a different model.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    from transformers import AutoConfig

    model_dir = Path(sys.argv[1])
    card = render_card(json.loads((model_dir / "pretraining.json").read_text()), AutoConfig.from_pretrained(model_dir))
    (model_dir / "README.md").write_text(card)
    print(f"wrote {model_dir / 'README.md'}")
