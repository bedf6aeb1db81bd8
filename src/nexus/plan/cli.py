"""Plan a NEXUS run from a model's config alone: sizes, adapter size and memory per stage.

    nexus plan --model path/to/gpt-oss-120b            # a model directory or a bare config.json
    nexus plan --model config.json --width-multiplier 2 --json
    nexus plan --model path/to/gpt-oss-120b --devices 8 --device-memory 80   # per rank, replicated or sharded
    nexus plan --model path/to/gpt-oss-120b --keep-raw 4096 --keep-hidden    # collect's raw sample
    nexus plan --model path/to/model --dtype float32                          # as the verbs' --dtype float32

The model is built on the meta device (no weights are read or allocated). Memory figures are for
weights and optimizer state; activations depend on batch size and sequence length and come on top.
With --devices, the plan also gives what each rank holds for train and for collect, validate and
precompute-teacher, the base replicated on every rank (--use-ddp) or sharded across them
(--shard-base), and with --device-memory which of the two fits. With --keep-raw N [--keep-hidden],
what collect's raw sample (and its hidden states) holds on each device, at a flush and on disk.
Non-quantized weights and hidden states are sized in the dtype the verbs load them in under the same
--dtype (default auto: the checkpoint's, read from its shards' headers when the directory holds them,
else from the config; bf16 where neither names one); the plan prints which.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from ..base.config import load_model_config
from ..device import DTYPES, dtype_name
from ..moe import check_width
from .core import check_devices, check_raw_sample, format_plan, make_plan


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model directory or bare config.json (no weights are read)")
    p.add_argument("--width-multiplier", type=float, default=1,
                   help="shared expert intermediate size = this x the routed expert's (default 1)")
    p.add_argument("--devices", type=int, metavar="N",
                   help="devices (ranks) to plan for: what each holds replicated (--use-ddp) and sharded "
                        "(--shard-base)")
    p.add_argument("--device-memory", type=float, metavar="GB",
                   help="GiB of memory per device: says whether the run fits replicated, sharded or not at all "
                        "(alone: one device)")
    p.add_argument("--keep-raw", type=int, default=0, metavar="N",
                   help="also size collect's raw sample of N tokens per layer (as `collect --keep-raw N`): on the "
                        "device, at a flush, on disk")
    p.add_argument("--keep-hidden", action="store_true",
                   help="with --keep-raw N: the sample keeps the tokens' hidden states too "
                        "(as `collect --keep-hidden`)")
    p.add_argument("--dtype", type=dtype_name, default="auto", metavar="{" + ",".join(DTYPES) + "}",
                   help="the --dtype the verbs will load the base with: sizes its non-quantized weights and "
                        "collect's hidden states (default auto: as stored in the checkpoint)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow custom modeling code from the model directory (off by default)")


def run(args) -> int:
    check_width(args.width_multiplier)
    check_devices(args.devices, args.device_memory)
    check_raw_sample(args.keep_raw, args.keep_hidden)
    plan = make_plan(load_model_config(args.model, "--model", args.trust_remote_code), args.width_multiplier,
                     args.devices, args.device_memory, args.keep_raw, args.keep_hidden, args.dtype, args.model)
    if args.json:
        fields = asdict(plan)
        for optional in ("devices", "raw_sample"):
            if fields[optional] is None:
                del fields[optional]
        print(json.dumps(fields, indent=2))
    else:
        print(format_plan(plan))
    return 0
