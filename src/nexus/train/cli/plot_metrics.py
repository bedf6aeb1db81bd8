"""Plot a training run's metrics: losses, LR and temperature, grad norm, router drift, throughput.

    nexus plot-metrics OUTPUT_DIR [--output OUTPUT_DIR/plots/metrics.png]

Reads OUTPUT_DIR/metrics.jsonl (and run_config.json, to draw the planned LR / temperature schedule
over the whole run next to the values actually used). Writes one PNG with five panels.
"""

from __future__ import annotations

import argparse

from ..plots import plot_run


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("output_dir", help="a `nexus train` output directory (holding metrics.jsonl)")
    p.add_argument("--output", help="PNG path (default: OUTPUT_DIR/plots/metrics.png)")


def run(args) -> int:
    path, n = plot_run(args.output_dir, args.output)
    print(f"wrote {path} ({n} steps)")
    return 0
