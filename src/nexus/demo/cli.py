"""Run the whole NEXUS pipeline on the bundled demo MoE and write a report, on a CPU in minutes.

    nexus demo                          # -> demo_out/REPORT.md
    nexus demo --output /tmp/demo --max-steps 20

The bundled model is a small GPT-OSS-architecture MoE pretrained by this project on the Python
standard library, with the `email` and `http` packages held out as a domain. The demo samples
general text, collects router statistics, analyzes them, attaches shared experts (the config's init:
random, the default), trains the shared experts on the held-out domain (distillation from the
bundled model plus LM loss), validates on general and domain text, and writes REPORT.md.
Stages that already finished are skipped, so an interrupted demo continues where it stopped.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..pipeline.runner import Context, run_pipeline
from .report import demo_config, write_report


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", default="demo_out", help="work directory for every stage's output (default demo_out)")
    p.add_argument("--max-steps", type=int, default=None,
                   help="training steps (default: the demo config's); fewer for a quick look")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run in well under a minute: few tokens, 4 training steps (figures not meaningful)")
    p.add_argument("--from", dest="start", default=None,
                   help="rerun this stage and every later one (sample, collect, analyze, convert, train, validate)")


def interrupted(args) -> str:
    """The Ctrl-C message: rerunning the same command skips finished stages and resumes the others."""
    from ..rerun import command

    return f"finished stages are kept; continue with: {command(args, drop={'--from': 1})}"


def run(args) -> int:
    from ..train.plots import plot_run

    cfg = demo_config(args.max_steps, args.quick)
    cfg["work_dir"] = str(Path(args.output).resolve())
    ctx = Context(cfg, Path.cwd())
    seconds: dict[str, float] = {}
    t0 = time.time()
    run_pipeline(cfg, Path.cwd(), start=args.start, timings=seconds)
    train_dir = Path(ctx.out("train"))
    plot_run(train_dir, title="demo training")  # as `nexus plot-metrics`: with the planned lr / temperature
    path, summary = write_report(ctx, seconds)
    print(f"\nNEXUS demo finished in {time.time() - t0:.0f}s. Report: {path}")
    print(summary)
    return 0
