"""Validate a model against its baseline on held-out data: perplexity, KL and routing per layer; then chat.

    nexus validate --model adapter/ --dataset general=heldout.jsonl --dataset domain=docs/ \\
        --compute-perplexity --num-samples 200 --seq-len 1024 --output validation/
    nexus validate --model adapter/ --chat                 # straight to an interactive chat
    nexus validate --model adapter/ --dataset heldout.jsonl --shard-base --nproc 4   # the base sharded (FSDP2)

The baseline defaults to the adapter's own base: the loaded model is then run a second time with its
shared experts switched off, so no second copy is loaded. --baseline naming another model (or
adapter) loads it and compares against that. Both see exactly the same tokens. Writes report.json,
report.md and plots/ to --output (the folder appears only once complete). With
--fail-on-degradation the exit code is 1 when a dataset's perplexity degrades by more than
--fail-threshold percent. --chat opens `nexus chat` on the model after the report.

With --shard-base the model (and a separately loaded baseline) is sharded over torchrun ranks (FSDP2;
relaunched on --nproc processes when started without torchrun): batch i is measured on rank i mod N,
the sums are combined, rank 0 writes the report. --chat (text generation) is refused with it.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from ..chat.session import add_sampling_arguments, sampling_from_args, start_chat
from ..defaults import SEQ_LEN_HELP
from ..device import add_device_arguments, load_for_inference, load_sharded_for_inference
from ..errors import NexusError
from ..launch import add_shard_arguments, check_shard_options, relaunch, under_torchrun
from .core import validate_model
from .report import EXCELLENT_BELOW_PCT, FAIL_ABOVE_PCT

_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def parse_datasets(values: list[str]) -> dict[str, str]:
    """`--dataset` values (`NAME=PATH` or `PATH`) -> {name: path}; a bare path is named by its stem."""
    out: dict[str, str] = {}
    for value in values or []:
        name, sep, path = value.partition("=")
        if not sep or Path(value).exists() or not _NAME.match(name):
            name, path = Path(value).stem or value, value
        if not path:
            raise NexusError(f"--dataset {value}: empty path (expected NAME=PATH or PATH)")
        if name in out:
            raise NexusError(f"--dataset: the name '{name}' is given twice; name them NAME=PATH")
        out[name] = path
    return out


def check_options(args) -> dict[str, str]:
    """Flag values alone (no file access; `nexus pipeline` checks these before any stage runs);
    returns the named datasets."""
    datasets = parse_datasets(args.dataset)
    if not datasets and not args.chat:
        raise NexusError("nothing to do: pass --dataset (held-out data to measure on) and/or --chat")
    if args.compute_perplexity and not datasets:
        raise NexusError("--compute-perplexity needs at least one --dataset")
    if args.fail_on_degradation and not args.compute_perplexity:
        raise NexusError("--fail-on-degradation needs --compute-perplexity (the verdict is on perplexity)")
    for flag, value, low in (("--num-samples", args.num_samples, 1), ("--seq-len", args.seq_len, 2),
                             ("--batch-size", args.batch_size, 1)):
        if value is not None and value < low:
            raise NexusError(f"{flag} must be >= {low}, got {value}")
    if args.excellent_threshold > args.fail_threshold:
        raise NexusError(f"--excellent-threshold ({args.excellent_threshold}) must not exceed "
                         f"--fail-threshold ({args.fail_threshold})")
    check_shard_options(args, {"--chat (text generation)": args.chat, "--dequantize": args.dequantize,
                               "--device auto (spread over GPUs)": args.device == "auto"})
    if args.chat:
        sampling_from_args(args)
    return datasets


def check_args(args) -> dict[str, str]:
    """Validate flag values and inputs before any model is loaded; returns the named datasets."""
    datasets = check_options(args)
    for path in datasets.values():  # before any model is loaded
        if not Path(path).exists():
            raise NexusError(f"--dataset {path}: no such file or directory")
    if datasets and Path(args.output).exists() and not args.overwrite:
        raise NexusError(f"--output {args.output}: exists (pass --overwrite to replace it)")
    return datasets


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="NEXUS adapter directory (or a transformers model directory)")
    p.add_argument("--baseline", default=None,
                   help="model to compare against (default: the adapter's base, run as the same loaded model "
                        "with the shared experts off)")
    p.add_argument("--dataset", action="append", default=[], metavar="[NAME=]PATH",
                   help="held-out data (.txt, .jsonl, .json, .parquet, folder, saved HF dataset); repeat for "
                        "several, e.g. --dataset general=a.jsonl --dataset domain=b/")
    p.add_argument("--text-field", default="text", help="record field holding the text (default text; "
                   "records with 'messages' are rendered with the chat template)")
    p.add_argument("--compute-perplexity", action="store_true",
                   help="compute perplexity and degradation (KL and routing metrics are always computed)")
    p.add_argument("--num-samples", type=int, default=200, help="evaluation sequences per dataset (default 200)")
    p.add_argument("--seq-len", type=int, default=None, help=f"tokens per sequence at most {SEQ_LEN_HELP}")
    p.add_argument("--batch-size", type=int, default=1, help="sequences per forward pass (default 1)")
    p.add_argument("--pack", action="store_true",
                   help="concatenate documents into full --seq-len sequences (default: one document per "
                        "sequence, padded)")
    p.add_argument("--output", default="validation", help="report directory (default ./validation)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output directory")
    p.add_argument("--excellent-threshold", type=float, default=EXCELLENT_BELOW_PCT,
                   help=f"degradation %% below which retention is excellent (default {EXCELLENT_BELOW_PCT:g})")
    p.add_argument("--fail-threshold", type=float, default=FAIL_ABOVE_PCT,
                   help=f"degradation %% above which the verdict is fail (default {FAIL_ABOVE_PCT:g})")
    p.add_argument("--fail-on-degradation", action="store_true",
                   help="exit with code 1 when a dataset's verdict is fail")
    p.add_argument("--chat", action="store_true", help="chat with the model after the report (see nexus chat)")
    add_sampling_arguments(p)
    add_device_arguments(p)
    add_shard_arguments(p)


def run(args) -> int:
    datasets = check_args(args)
    if args.shard_base:
        if not under_torchrun():
            return relaunch(args, "--shard-base")  # --shard-base stays on the relaunched command line
        from .. import dist

        try:  # no --chat here (refused by check_options)
            model, root = load_sharded_for_inference(args.model, args)
            return validate_model(model, datasets, args, root=root)
        finally:
            dist.shutdown()
    model = load_for_inference(args.model, args)
    code = 0
    if datasets:
        code = validate_model(model, datasets, args)
    if args.chat:
        start_chat(model, args.model, args)
    return code


