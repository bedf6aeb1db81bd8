r"""Precompute a teacher's top-k next-token log-probabilities for offline distillation.

    nexus precompute-teacher --model base/ --dataset data.jsonl --seq-len 1024 \
        --num-steps 10000 --batch-size 4 --top-k 64 --output cache/
    torchrun --nproc-per-node 2 -m nexus precompute-teacher ...        # ranks write disjoint shards
    nexus precompute-teacher ... --shard-base --nproc 4                # the teacher sharded too (FSDP2)
    nexus train --student-model adapter/ --precomputed-teacher cache/ --dataset data.jsonl --seq-len 1024 ...

The sequences are exactly those `nexus train` reads with the same --dataset, --seq-len, --seed and
packing, in the same order: --num-steps S --batch-size G stores S × G sequences, enough for S training
steps of global batch G (= --batch-size × --gradient-accumulation-steps × ranks in train). Storage:
k × 6 + 5 bytes per position (fp16 log-prob + int32 index per k, int32 id, uint8 mask); printed
before starting, and the run refuses to start without the disk room. Rerunning the same command
continues an interrupted cache from its last complete shard. With --shard-base the teacher is sharded over
the torchrun ranks (FSDP2; relaunched on --nproc processes when started without torchrun), and a
rank with fewer batches runs discarded forwards until the others are done. See
docs/offline-distillation.md.
"""

from __future__ import annotations

import argparse

from ..flags import add_flags, from_args
from ..launch import NPROC_HELP, check_shard_options, relaunch, under_torchrun
from .precompute import PrecomputeConfig, precompute


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_flags(p, PrecomputeConfig, ["model", "dataset", "output"])
    n = p.add_mutually_exclusive_group(required=True)
    add_flags(n, PrecomputeConfig, ["num_sequences", "num_steps"])
    add_flags(p, PrecomputeConfig, ["batch_size", "seq_len", "top_k", "router_topk", "seed", "pack", "text_field",
                                    "split", "shard_size", "device", "dtype", "dequantize", "shard_base"])
    p.add_argument("--nproc", type=int, help=NPROC_HELP)


def check_options(args) -> None:
    """Flag values alone (no file access); `nexus pipeline` checks these before any stage runs."""
    check_shard_options(args, {})
    from_args(PrecomputeConfig, args).check()


def interrupted(args) -> str:
    """The Ctrl-C message: complete shards are kept and the same command continues from them."""
    from ..rerun import command

    return f"the complete shards in {args.output} are kept; continue with the same command: {command(args)}"


def run(args) -> int:
    cfg = from_args(PrecomputeConfig, args)
    if cfg.shard_base and not under_torchrun():
        check_options(args)  # before any process starts
        return relaunch(args, "--shard-base")  # --shard-base stays on the relaunched command line
    check_shard_options(args, {})
    try:
        precompute(cfg)
    finally:
        from .. import dist

        dist.shutdown()
    return 0
