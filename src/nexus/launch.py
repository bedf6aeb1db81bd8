"""Relaunching a verb under torchrun: `train --use-ddp` and `--shard-base` (train, collect, validate,
precompute-teacher) started without torchrun run the same command on `--nproc` processes.

    nexus collect ... --shard-base --nproc 4   # = torchrun --standalone --nproc-per-node 4 -m nexus collect ... --shard-base

`--use-ddp` and `--nproc` are dropped from the relaunched command line; `--shard-base` stays on it
(the workers load the base sharded).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from .errors import NexusError
from .sharding import SHARD_BASE_HELP

NPROC_HELP = "processes for --shard-base (default: GPU count, or 2 on CPU)"


def under_torchrun() -> bool:
    """True in a torchrun worker of a job of more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def add_shard_arguments(p: argparse.ArgumentParser) -> None:
    """`--shard-base` and `--nproc` of a verb that only runs forwards of the base (collect, validate, ...)."""
    p.add_argument("--shard-base", action="store_true", help=SHARD_BASE_HELP)
    p.add_argument("--nproc", type=int, help=NPROC_HELP)


def check_shard_options(args, refused: dict[str, bool]) -> None:
    """Refuse `--nproc` without `--shard-base`, and each flag of `refused` ({flag: given}) with it."""
    nproc = getattr(args, "nproc", None)
    if nproc is not None and nproc < 1:
        raise NexusError(f"--nproc must be at least 1, got {nproc}")
    if not getattr(args, "shard_base", False):
        if nproc is not None:
            raise NexusError("--nproc is the process count of --shard-base: pass --shard-base too (or start the "
                             "command under torchrun)")
        return
    for flag, given in refused.items():
        if given:
            raise NexusError(f"{flag} with --shard-base is not supported")


def relaunch(args, flag: str) -> int:
    """Run this command again under torchrun on `--nproc` processes (`flag` names why, in errors).

    The command line is `args.argv` (set by `nexus.cli.main` and by the pipeline for this verb alone),
    never sys.argv, which under `nexus pipeline` would relaunch every stage on every rank.
    """
    import torch

    nproc = getattr(args, "nproc", None) or torch.cuda.device_count() or 2
    argv = getattr(args, "argv", None)
    if argv is None:
        raise NexusError(f"{flag}: the command line to relaunch is unknown (run it as a `nexus` command)")
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--use-ddp":
            continue
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "nexus",
           *out]
    print("launching: " + " ".join(cmd), flush=True)
    return subprocess.call(cmd, env=dict(os.environ))
