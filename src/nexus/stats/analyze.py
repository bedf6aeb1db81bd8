"""PCA of the router statistics and expert selection: the run of `nexus analyze` (see
`nexus.stats.cli.analyze`). `analyze_stats` is the pure part (statistics in, pca_stats.json's dict
out); `analyze` reads, checks and writes. The format is DESIGN.md's pca_stats.json."""

from __future__ import annotations

from pathlib import Path

from ..errors import NexusError
from ..fsutil import atomic_dir, write_json
from .accumulate import FIELDS, RouterStats
from .pca import HEADLINE_K, analyze_layer, summarize

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
    from ..base.config import load_model_config

    if is_adapter_dir(path):
        cfg = read_adapter_config(path)
        return cfg.model_type, list(cfg.moe_layers), cfg.num_experts
    from transformers import AutoModelForCausalLM

    config = load_model_config(path)
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


def analyze(stats_file: str, output: str = "pca_stats.json", top_k: int | str = "auto", importance: str = "pca", n_components: int = 10,
            merge_weights: str = "equal", auto_share: float = 0.5, plots_dir: str | None = None, plots: bool = True,
            model: str | None = None) -> dict:
    """Analyze router statistics and write pca_stats.json (and plots) as `nexus analyze` describes;
    arguments are its flags. Returns the analysis."""
    stats, _ = RouterStats.load(stats_file)
    if stats.tokens == 0:
        raise NexusError(f"{stats_file}: statistics hold no tokens")
    if top_k != "auto" and top_k > stats.num_experts:
        raise NexusError(f"--top-k {top_k} is larger than the {stats.num_experts} experts per layer of "
                         f"{stats_file}; pass at most {stats.num_experts}, or auto")
    if model:
        check_against_model(stats, model, stats_file)
    result = analyze_stats(stats, top_k, importance, n_components, merge_weights, auto_share)
    output = Path(output)
    plots_dir = Path(plots_dir) if plots_dir else output.parent / "plots"
    if not plots:
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
          f"{ks[0] if len(ks) == 1 else f'{ks[0]}-{ks[-1]}'} per layer ({importance}, {merge_weights} "
          f"weights) -> {output}" + (f", {plots_dir}/" if plots else ""))
    for note in s["notes"]:
        print(f"note: {note}")
    return result
