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

from ...errors import NexusError
from ...flags import add_function_flags, function_args
from ...rerun import nothing_written
from ..analyze import analyze
from ..pca import IMPORTANCE, MERGE_WEIGHTS


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


FLAGS = {  # analyze()'s parameters: their defaults and types are its signature's
    "stats_file": {"option": "--input", "metavar": "INPUT", "help": "router statistics from `nexus collect`"},
    "output": {"help": "analysis JSON to write"},
    "top_k": {"type": _top_k, "help": "experts selected per layer, or 'auto' (per layer, from the importance curve)"},
    "importance": {"choices": IMPORTANCE, "help": "expert importance: pca (original tool), frequency (routed share) "
                                                  "or gate (mean routing weight)"},
    "n_components": {"help": "principal components in the pca score"},
    "merge_weights": {"choices": MERGE_WEIGHTS, "help": "weights of the selected experts: equal (the original "
                                                        "tool's average) or importance (proportional)"},
    "auto_share": {"help": "--top-k auto: smallest k holding this share of importance, within the category's range"},
    "plots_dir": {"help": "directory for plots and summary.md (default: plots/ beside --output)"},
    "plots": {"negate": "--no-plots", "help": "write only the JSON"},
    "model": {"help": "check the statistics against this model's config (optional)"},
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_function_flags(p, analyze, FLAGS)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")


interrupted = nothing_written  # the Ctrl-C message: the output is written atomically


def run(args) -> int:
    if args.n_components < 1:
        raise NexusError(f"--n-components must be at least 1, got {args.n_components}")
    if not 0 < args.auto_share <= 1:
        raise NexusError(f"--auto-share must be in (0, 1], got {args.auto_share}")
    if Path(args.output).exists() and not args.overwrite:
        raise NexusError(f"--output {args.output} exists (pass --overwrite to replace it)")
    analyze(**function_args(args, FLAGS))
    return 0
