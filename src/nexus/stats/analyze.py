"""PCA of the router statistics and expert selection for the shared expert's initialization.

    nexus analyze --input router_stats.safetensors --output pca_stats.json
    nexus analyze --input router_stats.safetensors --output pca_stats.json --top-k 24 --importance pca \\
        --n-components 10 --merge-weights importance --model path/to/model

Per MoE layer: covariance of the router probabilities (from the streaming sums), eigen-decomposition
and explained-variance ratios; expert importance (`pca`: sum_i |loading_{i,e}| x explained-variance
ratio_i over the top --n-components, the original tool's score; `frequency`: share of routed top-k
slots; `gate`: mean routing weight); the --top-k most important experts (`auto`: the smallest k
holding --auto-share of the importance, clamped into the layer category's recommended range) and
their merge weights (`equal` or proportional to `importance`), which `nexus convert` uses.

Categories follow the original tool, on the top-4 share of importance: > 70 % steep_cliff (k 4),
> 50 % moderate (k 4-8), > 35 % gradual (k 8-16), else even (k 24+); k never exceeds the expert
count. Output: pca_stats.json (DESIGN.md format, plus per-layer extras) and, in --plots-dir
(default: `plots/` beside the output), four PNG plots and summary.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import NexusError
from ..fsutil import atomic_dir, write_json
from ..rerun import nothing_written
from .accumulate import FIELDS, RouterStats
from .pca import HEADLINE_K, IMPORTANCE, MERGE_WEIGHTS, analyze_layer, summarize

FORMAT = "nexus-pca-stats"
VERSION = 1


def analyze_stats(stats: RouterStats, top_k: int | str = "auto", importance: str = "pca", n_components: int = 10,
                  merge_weights: str = "equal", auto_share: float = 0.5) -> dict:
    """The pca_stats.json dictionary for `stats`."""
    layers = {}
    for i in stats.moe_layers:
        sums = {f: stats.sums[i][f].detach().cpu().double().numpy() for f in FIELDS}
        layers[str(i)] = analyze_layer(sums, top_k, importance, n_components, merge_weights, auto_share, stats.top_k)
    return {
        "format": FORMAT, "version": VERSION, "model_type": stats.model_type, "num_experts": stats.num_experts,
        "routing_top_k": stats.top_k, "tokens": stats.tokens, "source_model": stats.source_model,
        "selection": {"top_k": top_k, "importance": importance, "n_components": min(n_components, stats.num_experts),
                      "merge_weights": merge_weights, "auto_share": auto_share},
        "summary": summarize(layers, stats.num_experts),
        "layers": layers,
    }


def model_shape(path: str) -> tuple[str, list[int], int]:
    """(model_type, MoE layers, experts per layer) of a model or adapter directory, from its config only."""
    import torch

    from ..adapter import is_adapter_dir, read_adapter_config
    from ..moe import find_moe_blocks
    from ..plan import load_config

    if is_adapter_dir(path):
        cfg = read_adapter_config(path)
        return cfg.model_type, list(cfg.moe_layers), cfg.num_experts
    from transformers import AutoModelForCausalLM

    config = load_config(path)
    with torch.device("meta"):
        blocks = find_moe_blocks(AutoModelForCausalLM.from_config(config))
    return config.model_type, [b.layer for b in blocks], blocks[0].layout.num_experts


def check_against_model(stats: RouterStats, model: str, source: str) -> None:
    model_type, layers, experts = model_shape(model)
    if experts != stats.num_experts:
        raise NexusError(f"{source}: statistics have {stats.num_experts} experts per layer, but --model {model} "
                         f"has {experts}; collect statistics with this model")
    if layers != stats.moe_layers or model_type != stats.model_type:
        raise NexusError(f"{source}: statistics are for {stats.model_type} MoE layers {stats.moe_layers}, but "
                         f"--model {model} is {model_type} with MoE layers {layers}")


def _top_k(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        k = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {value!r}") from None
    if k < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {value!r}")
    return k


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", required=True, help="router statistics from `nexus collect`")
    p.add_argument("--output", default="pca_stats.json", help="analysis JSON to write (default pca_stats.json)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--top-k", type=_top_k, default="auto",
                   help="experts selected per layer, or 'auto' (per layer, from the importance curve; default)")
    p.add_argument("--importance", choices=IMPORTANCE, default="pca",
                   help="expert importance: pca (original tool, default), frequency (routed share) or gate "
                        "(mean routing weight)")
    p.add_argument("--n-components", type=int, default=10, help="principal components in the pca score (default 10)")
    p.add_argument("--merge-weights", choices=MERGE_WEIGHTS, default="equal",
                   help="weights of the selected experts: equal (the original tool's average; default) or "
                        "importance (proportional)")
    p.add_argument("--auto-share", type=float, default=0.5,
                   help="--top-k auto: smallest k holding this share of importance, within the category's "
                        "range (default 0.5)")
    p.add_argument("--plots-dir", default=None,
                   help="directory for plots and summary.md (default: plots/ beside --output)")
    p.add_argument("--no-plots", action="store_true", help="write only the JSON")
    p.add_argument("--model", default=None, help="check the statistics against this model's config (optional)")


interrupted = nothing_written  # the Ctrl-C message: the output is written atomically


def run(args) -> int:
    if args.n_components < 1:
        raise NexusError(f"--n-components must be at least 1, got {args.n_components}")
    if not 0 < args.auto_share <= 1:
        raise NexusError(f"--auto-share must be in (0, 1], got {args.auto_share}")
    if Path(args.output).exists() and not args.overwrite:
        raise NexusError(f"--output {args.output} exists (pass --overwrite to replace it)")
    stats, _ = RouterStats.load(args.input)
    if stats.tokens == 0:
        raise NexusError(f"{args.input}: statistics hold no tokens")
    if args.top_k != "auto" and args.top_k > stats.num_experts:
        raise NexusError(f"--top-k {args.top_k} is larger than the {stats.num_experts} experts per layer of "
                         f"{args.input}; pass at most {stats.num_experts}, or auto")
    if args.model:
        check_against_model(stats, args.model, args.input)
    result = analyze_stats(stats, args.top_k, args.importance, args.n_components, args.merge_weights, args.auto_share)
    output = Path(args.output)
    plots_dir = Path(args.plots_dir) if args.plots_dir else output.parent / "plots"
    if args.no_plots:
        write_json(output, result)
    else:
        from .plots import write_all

        with atomic_dir(plots_dir, overwrite=True) as tmp:  # plots appear with the JSON, or not at all
            write_all(result, tmp)
            write_json(output, result)
    s = result["summary"]
    ks = sorted({entry["k"] for entry in result["layers"].values()})
    print(f"analyzed {len(result['layers'])} MoE layers x {stats.num_experts} experts over {stats.tokens:,} tokens: "
          f"top-{HEADLINE_K[0]} share {s['top4_share']:.1%}, top-{HEADLINE_K[1]} share {s['top24_share']:.1%} -> "
          f"{s['category']} (recommended k {s['recommended_top_k']}); selected k "
          f"{ks[0] if len(ks) == 1 else f'{ks[0]}-{ks[-1]}'} per layer ({args.importance}, {args.merge_weights} "
          f"weights) -> {output}" + ("" if args.no_plots else f", {plots_dir}/"))
    for note in s["notes"]:
        print(f"note: {note}")
    return 0
