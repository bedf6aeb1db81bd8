r"""Precompute a teacher's top-k next-token log-probabilities for offline distillation.

    nexus precompute-teacher --model base/ --dataset data.jsonl --seq-len 1024 \
        --num-steps 10000 --batch-size 4 --top-k 64 --output cache/
    torchrun --nproc-per-node 2 -m nexus precompute-teacher ...        # ranks write disjoint shards
    nexus train --student-model adapter/ --precomputed-teacher cache/ --dataset data.jsonl --seq-len 1024 ...

The sequences are exactly those `nexus train` reads with the same --dataset, --seq-len, --seed and
packing, in the same order: --num-steps S --batch-size G stores S × G sequences, enough for S training
steps of global batch G (= --batch-size × --gradient-accumulation-steps × ranks in train). Storage:
k × 6 + 5 bytes per position (fp16 log-prob + int32 index per k, int32 id, uint8 mask); printed
before starting, and the run refuses to start without the disk room. Rerunning the same command
continues an interrupted cache from its last complete shard. See docs/offline-distillation.md.
"""

from __future__ import annotations

import argparse
from dataclasses import fields

from ..base.loader import DEQUANTIZE_HELP
from ..defaults import SEQ_LEN_HELP
from .precompute import PrecomputeConfig, precompute

_D = {f.name: f.default for f in fields(PrecomputeConfig)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="the teacher: a model directory (or an adapter directory)")
    p.add_argument("--dataset", required=True, help="the training data, as given to `nexus train --dataset`")
    p.add_argument("--output", required=True, help="cache directory")
    n = p.add_mutually_exclusive_group(required=True)
    n.add_argument("--num-sequences", type=int, help="stream positions to store")
    n.add_argument("--num-steps", type=int, help="store --num-steps × --batch-size sequences")
    p.add_argument("--batch-size", type=int, default=_D["batch_size"],
                   help="sequences per forward, and per step for --num-steps")
    p.add_argument("--seq-len", type=int, default=_D["seq_len"],
                   help=f"tokens per sequence; must equal train's --seq-len {SEQ_LEN_HELP}")
    p.add_argument("--top-k", type=int, default=_D["top_k"], help="log-probabilities stored per position")
    p.add_argument("--router-topk", type=int, help="also store the top-R router log-probs of every MoE layer "
                                                   "(for --router-kl-weight and router metrics offline)")
    p.add_argument("--seed", type=int, default=_D["seed"], help="data order; must equal train's --seed")
    p.add_argument("--no-pack", dest="pack", action="store_false", help="as train's --no-pack")
    p.add_argument("--text-field", default=_D["text_field"],
                   help='record field holding the text (chat records use "messages")')
    p.add_argument("--split",
                   help='split of a saved Hugging Face dataset (default: train)')
    p.add_argument("--shard-size", type=int, default=_D["shard_size"], help="sequences per shard")
    p.add_argument("--device",
                   help="cpu, cuda or cuda:N (default: cuda if available); under torchrun, each rank's GPU")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help='dtype of the teacher weights (default: as stored)')
    p.add_argument("--dequantize", action="store_true", help=DEQUANTIZE_HELP)


def interrupted(args) -> str:
    """The Ctrl-C message: complete shards are kept and the same command continues from them."""
    from ..rerun import command

    return f"the complete shards in {args.output} are kept; continue with the same command: {command(args)}"


def run(args) -> int:
    cfg = PrecomputeConfig(**{f.name: getattr(args, f.name) for f in fields(PrecomputeConfig)})
    try:
        precompute(cfg)
    finally:
        from .. import dist

        dist.shutdown()
    return 0
