"""Measure how a MoE model's routing differs between a held-out domain and general text.

    python scripts/testbed_routing.py /tmp/nexus-testbed                  # the testbed's corpus
    python scripts/testbed_routing.py src/nexus/assets/demo-model --corpus demo   # the demo's own splits

For every layer: the routing distribution of a split is the mean share of the router's top-k
assignments each expert receives over the split's tokens. Reported per layer and on average:

- total-variation distance between the held-out domain's distribution and general text's,
  TV(p, q) = 1/2 * sum_e |p_e - q_e| (0 = identical routing, 1 = disjoint experts);
- overlap of the two splits' 8 most-used experts (ties broken by expert index), out of 8;
- the least-used expert's share on all eval tokens (1/E is even; 0 means a dead expert),
  and LM loss / perplexity per domain;
- with --selected (e.g. a study work directory's setup.json): the share of each split's assignments
  that go to selected experts, such as the ones ESFT trains (a shared expert is on every token's path).

Corpora: `testbed` (scripts/testbed_data.py: general = python + c + perl eval files, domain = man
eval files) or `demo` (nexus.demo_data: general_eval vs domain_eval, the stdlib's email + http).
Runs on one thread by default; prints a table and, with --json, writes every figure.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
sys.path[:0] = [str(SCRIPTS.parent / "src"), str(SCRIPTS)]

TOP_N = 8


# -- pure figures (tested in tests/test_testbed.py) ---------------------------------------------------

def shares(counts) -> list[float]:
    """A count vector normalized to shares summing to 1."""
    total = float(sum(counts))
    return [float(c) / total for c in counts] if total else [0.0] * len(counts)


def tv_distance(p, q) -> float:
    """Total-variation distance 1/2 * sum |p - q| between two distributions over the same experts."""
    if len(p) != len(q):
        raise ValueError("distributions over different expert counts")
    return 0.5 * sum(abs(a - b) for a, b in zip(p, q))


def top_experts(share, n: int = TOP_N) -> list[int]:
    """Indices of the `n` most-used experts, most used first (ties: lower index first)."""
    return sorted(range(len(share)), key=lambda e: (-share[e], e))[:n]


def top_overlap(p, q, n: int = TOP_N) -> int:
    """How many of p's `n` most-used experts are also among q's."""
    return len(set(top_experts(p, n)) & set(top_experts(q, n)))


def compare(domain_counts, general_counts, n: int = TOP_N) -> dict:
    """Per-layer and mean TV / top-n overlap / least-used share, from [layers][experts] counts."""
    layers = []
    for d, g in zip(domain_counts, general_counts):
        p, q = shares(d), shares(g)
        both = shares([a + b for a, b in zip(d, g)])
        layers.append({"tv": tv_distance(p, q), "top_overlap": top_overlap(p, q, n),
                       "domain_top": top_experts(p, n), "general_top": top_experts(q, n),
                       "min_share_domain": min(p), "min_share_general": min(q), "min_share_all": min(both),
                       "max_share_all": max(both)})
    mean = lambda k: sum(row[k] for row in layers) / len(layers)  # noqa: E731
    return {"top_n": n, "layers": layers, "mean_tv": mean("tv"), "min_tv": min(r["tv"] for r in layers),
            "mean_top_overlap": mean("top_overlap"), "max_top_overlap": max(r["top_overlap"] for r in layers),
            "min_share_all": min(r["min_share_all"] for r in layers)}


def selected_share(counts, selected: dict[int, list[int]]) -> list[float]:
    """Per layer of [layers][experts] counts, the share of the top-k assignments that go to that layer's
    `selected` experts (e.g. the ones ESFT trains): how much of a split's routing passes through them."""
    return [sum(row[e] for e in selected[layer]) / sum(row) if sum(row) else 0.0
            for layer, row in enumerate(counts)]


def load_selections(path: Path) -> dict[str, dict[int, list[int]]]:
    """Named per-layer expert selections from a JSON file: a study work directory's setup.json (its `esft`
    selections) or one {layer: [experts]} mapping, named after the file."""
    try:
        data = json.loads(path.read_text())
        named = data["esft"] if isinstance(data, dict) and "esft" in data else {path.stem: data}
        return {name: {int(layer): [int(e) for e in experts] for layer, experts in sel.items()}
                for name, sel in named.items()}
    except (OSError, ValueError, TypeError, AttributeError, KeyError) as e:
        raise SystemExit(f"--selected {path}: expected a study setup.json or a JSON {{layer: [experts]}} ({e})")


def selection_figures(result: dict, selections: dict[str, dict[int, list[int]]]) -> dict:
    """{name: {experts per layer, domain and general share per layer, their means}} for a `measure` result."""
    E = result["num_experts"]
    domain = result["counts"][result["held_out"]]
    general = [[sum(result["counts"][s][layer][e] for s in result["general"]) for e in range(E)]
               for layer in range(len(domain))]
    out = {}
    for name, sel in selections.items():
        if sorted(sel) != list(range(len(domain))) or any(not 0 <= e < E for v in sel.values() for e in v):
            raise SystemExit(f"--selected: selection {name!r} names layers {sorted(sel)} / experts outside "
                             f"0..{E - 1}; the model has {len(domain)} MoE layers of {E} experts")
        d, g = selected_share(domain, sel), selected_share(general, sel)
        out[name] = {"experts": {str(k): v for k, v in sorted(sel.items())}, "domain": d, "general": g,
                     "mean_domain": sum(d) / len(d), "mean_general": sum(g) / len(g)}
    return out


# -- model side -----------------------------------------------------------------------------------------

def route_and_score(model, blocks, batch_size: int = 16) -> dict:
    """Router top-k assignment counts per layer ([L][E]) and summed next-token NLL over `blocks` (N, T)."""
    import torch
    import torch.nn.functional as F

    cfg = model.config
    E, k = cfg.num_local_experts, cfg.num_experts_per_tok
    counts = torch.zeros(cfg.num_hidden_layers, E, dtype=torch.float64)
    nll, n_pred = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(blocks), batch_size):
            x = blocks[i: i + batch_size]
            out = model(input_ids=x, output_router_logits=True, use_cache=False)
            logits = out.logits[:, :-1]
            nll += F.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1), reduction="sum").item()
            n_pred += x[:, 1:].numel()
            for layer, router_logits in enumerate(out.router_logits):  # (B*T, E)
                idx = router_logits.topk(k, dim=-1).indices
                counts[layer] += torch.bincount(idx.reshape(-1), minlength=E).double()
    return {"counts": counts.tolist(), "nll": nll, "predicted": n_pred, "routed_tokens": int(blocks.numel())}


def eval_texts(corpus: str) -> tuple[dict[str, list[str]], list[str], str]:
    """({eval set: texts}, the sets pooled as general text, the held-out domain's set)."""
    if corpus == "testbed":
        import testbed_data

        texts = testbed_data.build_corpus(with_packages=False)["texts"]
        sets = {d: [t for dom, _, t in texts["general_eval"] if dom == d] for d in testbed_data.GENERAL_DOMAINS}
        sets[testbed_data.HELD_OUT] = [t for _, _, t in texts["domain_eval"]]
        return sets, list(testbed_data.GENERAL_DOMAINS), testbed_data.HELD_OUT
    if corpus == "demo":
        from nexus import demo_data

        return ({"general": demo_data.stdlib_texts("general_eval"), "email+http": demo_data.stdlib_texts("domain_eval")},
                ["general"], "email+http")
    raise ValueError(f"unknown corpus {corpus!r}")


def measure(model, tokenizer, corpus: str, seq_len: int, batch_size: int = 16) -> dict:
    """Every figure of the module docstring for `model` on `corpus`."""
    from pretrain_demo import pack

    sets, general, domain = eval_texts(corpus)
    per_set = {}
    for name, texts in sets.items():
        r = route_and_score(model, pack(texts, tokenizer, seq_len), batch_size)
        loss = r["nll"] / r["predicted"]
        per_set[name] = {"counts": r["counts"], "tokens": r["predicted"], "loss": loss, "perplexity": math.exp(loss)}
    L, E = len(per_set[domain]["counts"]), len(per_set[domain]["counts"][0])
    gen_counts = [[sum(per_set[s]["counts"][layer][e] for s in general) for e in range(E)] for layer in range(L)]
    gen_nll = sum(per_set[s]["loss"] * per_set[s]["tokens"] for s in general)
    gen_tokens = sum(per_set[s]["tokens"] for s in general)
    result = compare(per_set[domain]["counts"], gen_counts)
    result.update({
        "corpus": corpus, "held_out": domain, "general": general, "seq_len": seq_len,
        "num_experts": E, "top_k": model.config.num_experts_per_tok,
        "general_eval": {"tokens": gen_tokens, "loss": gen_nll / gen_tokens, "perplexity": math.exp(gen_nll / gen_tokens)},
        "sets": {name: {"tokens": s["tokens"], "loss": s["loss"], "perplexity": s["perplexity"],
                        # each set's routing against the pooled general text, for context
                        "mean_tv_vs_general": compare(s["counts"], gen_counts)["mean_tv"]}
                 for name, s in per_set.items()},
        "counts": {name: s["counts"] for name, s in per_set.items()},
    })
    return result


def render(result: dict) -> str:
    """Markdown tables of a `measure` result."""
    E, n = result["num_experts"], result["top_n"]
    lines = [f"Held-out domain `{result['held_out']}` ({result['sets'][result['held_out']]['tokens']:,} tokens) vs "
             f"general text ({' + '.join(result['general'])}, {result['general_eval']['tokens']:,} tokens); "
             f"{E} experts, top-{result['top_k']}; even share 1/{E} = {1 / E:.4f}.", "",
             f"| layer | TV distance | top-{n} overlap | domain top-{n} | general top-{n} | least-used share (all eval) "
             f"| busiest share (all eval) |", "|---|---|---|---|---|---|---|"]
    for i, r in enumerate(result["layers"]):
        lines.append(f"| {i} | {r['tv']:.3f} | {r['top_overlap']} of {n} | {' '.join(map(str, r['domain_top']))} | "
                     f"{' '.join(map(str, r['general_top']))} | {r['min_share_all']:.4f} | {r['max_share_all']:.4f} |")
    lines.append(f"| **mean** | **{result['mean_tv']:.3f}** | **{result['mean_top_overlap']:.2f} of {n}** "
                 f"(max {result['max_top_overlap']}) | | | {result['min_share_all']:.4f} (min) | |")
    lines += ["", "| eval set | tokens | LM loss | perplexity | mean TV vs general |", "|---|---|---|---|---|"]
    for name, s in result["sets"].items():
        lines.append(f"| `{name}` | {s['tokens']:,} | {s['loss']:.4f} | {s['perplexity']:.2f} | {s['mean_tv_vs_general']:.3f} |")
    g = result["general_eval"]
    lines.append(f"| general (pooled) | {g['tokens']:,} | {g['loss']:.4f} | {g['perplexity']:.2f} | 0 |")
    return "\n".join(lines + render_selected(result).splitlines())


def render_selected(result: dict) -> str:
    """Markdown tables of a `measure` result's `selected` figures (--selected), one per selection."""
    lines = []
    for name, sel in result.get("selected", {}).items():
        lines += ["", f"Share of the top-{result['top_k']} assignments that go to the experts of selection `{name}`:",
                  "", "| layer | experts | domain | general |", "|---|---|---|---|"]
        lines += [f"| {layer} | {' '.join(map(str, ex))} | {d:.3f} | {g:.3f} |"
                  for (layer, ex), d, g in zip(sel["experts"].items(), sel["domain"], sel["general"])]
        lines.append(f"| **mean** | | **{sel['mean_domain']:.3f}** | **{sel['mean_general']:.3f}** |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", type=Path)
    p.add_argument("--corpus", choices=("testbed", "demo"), default=None,
                   help="default: demo for a model made by pretrain_demo.py, else testbed")
    p.add_argument("--seq-len", type=int, default=None, help="default: the model's pretraining sequence length")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=None, help="write every figure here")
    p.add_argument("--selected", type=Path, default=None,
                   help="also report the share of each split's routing that goes to selected experts: a study work "
                        "directory's setup.json (its ESFT selections) or a JSON {layer: [experts]}")
    args = p.parse_args(argv)
    selections = load_selections(args.selected) if args.selected else None
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    report = {}
    if (args.model / "pretraining.json").exists():
        report = json.loads((args.model / "pretraining.json").read_text())
    corpus = args.corpus or ("demo" if report.get("format") == "nexus-demo-pretraining" else "testbed")
    seq_len = args.seq_len or report.get("args", {}).get("seq_len", 256)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    t = time.time()
    result = measure(model, tokenizer, corpus, seq_len, args.batch_size)
    if selections:
        result["selected"] = selection_figures(result, selections)
    result["seconds"] = round(time.time() - t, 1)
    result["command"] = "python scripts/testbed_routing.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(render(result))
    print(f"\n({result['seconds']:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
