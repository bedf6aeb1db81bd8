"""Plan a NEXUS run from a model's config alone: sizes, adapter size and memory per stage.

    nexus plan --model path/to/gpt-oss-120b            # a model directory or a bare config.json
    nexus plan --model config.json --width-multiplier 2 --json

The model is built on the meta device (no weights are read or allocated). Memory figures are for
weights and optimizer state; activations depend on batch size and sequence length and come on top.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from ..base.config import load_model_config
from ..moe import check_width
from .core import format_plan, make_plan


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model directory or bare config.json (no weights are read)")
    p.add_argument("--width-multiplier", type=float, default=1,
                   help="shared expert intermediate size = this x the routed expert's (default 1)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow custom modeling code from the model directory (off by default)")


def run(args) -> int:
    check_width(args.width_multiplier)
    plan = make_plan(load_model_config(args.model, "--model", args.trust_remote_code), args.width_multiplier)
    print(json.dumps(asdict(plan), indent=2) if args.json else format_plan(plan))
    return 0
