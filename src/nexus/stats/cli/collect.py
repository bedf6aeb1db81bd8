"""Router statistics: run the model over a sample and accumulate streaming statistics per MoE layer.

    nexus collect --model path/to/model --dataset sample.jsonl --output router_stats.safetensors
    nexus collect --model path/to/model --dataset sample.jsonl --resume          # after an interruption
    torchrun --nproc-per-node 2 -m nexus collect --model ... --dataset ...         # batches sharded over ranks
    nexus collect --model ... --dataset ... --shard-base --nproc 4                  # the model sharded too (FSDP2)
    nexus collect --merge a.safetensors b.safetensors --output all.safetensors

Documents (the JSONL written by `nexus sample`, or any --dataset) are tokenized with EOS appended,
cut into pieces of at most --seq-len tokens (no packing across documents) and batched in order until
--target-tokens real tokens; padding never enters the statistics. For every MoE layer the router
logits are taken from the router module itself and accumulated as float64 sums (count, prob_sum,
prob_outer, topk_count, gate_sum, entropy_sum; see DESIGN.md), so memory does not grow with tokens.

Every --flush-every batches the running sums are written atomically to `<stem>.partial.safetensors`
with the data position; `--resume` continues from there and ends with the same statistics as an
uninterrupted run; without `--resume` a partial file is refused (the message gives the command that
resumes and the one that starts over, `--overwrite`), and Ctrl-C prints the command that resumes.
Under torchrun, global batch b goes to rank b mod world size and the sums are
all-reduced. With `--shard-base` the model itself is sharded over the ranks (FSDP2; relaunched under
torchrun on --nproc processes when started without it); a rank out of batches runs forwards that
count nothing until the others are done. `--keep-raw N` also keeps a uniform sample of N probability vectors per layer in
`<stem>.raw.safetensors` (for plots; see nexus.stats.reservoir); `--keep-hidden` keeps those tokens'
hidden states as the experts read them too (N x hidden size per layer, in the model's dtype, held on
the device while collecting), which `nexus convert --hidden-sample` uses to rank hidden units by
their activations for feature_topK / pruned_topK.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ...base.loader import DEQUANTIZE_HELP
from ...defaults import SEQ_LEN_HELP
from ...device import DTYPES, dtype_name
from ...errors import NexusError
from ...launch import add_shard_arguments, check_shard_options, relaunch, under_torchrun
from ...rerun import command
from ..collect import collect, merge, partial_description, partial_path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="model or adapter directory")
    p.add_argument("--dataset", help="the sample JSONL from `nexus sample`, or any dataset `nexus sample` reads")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the model's)")
    p.add_argument("--output", default="router_stats.safetensors",
                   help="statistics file (default router_stats.safetensors)")
    p.add_argument("--target-tokens", type=int, default=1_000_000,
                   help="real (non-padding) tokens to collect; 0 = the whole dataset (default 1000000)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward (default 8)")
    p.add_argument("--seq-len", type=int, default=None,
                   help=f"longest sequence; longer documents are split {SEQ_LEN_HELP}")
    p.add_argument("--dtype", type=dtype_name, default="auto", metavar="{" + ",".join(DTYPES) + "}",
                   help="dtype of the model's weights; auto = as stored in the checkpoint (default auto)")
    p.add_argument("--dequantize", action="store_true", help=DEQUANTIZE_HELP)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default auto)")
    p.add_argument("--flush-every", type=int, default=50,
                   help="write the partial statistics every N batches, for --resume (default 50)")
    p.add_argument("--resume", action="store_true", help="continue from <output stem>.partial.safetensors")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --output and discard a partial run's statistics")
    p.add_argument("--keep-raw", type=int, default=0, metavar="N",
                   help="also keep a uniform sample of N raw probability vectors per layer (default 0)")
    p.add_argument("--keep-hidden", action="store_true",
                   help="with --keep-raw N: also keep those N tokens' hidden states as each layer's experts read "
                        "them (for `nexus convert --hidden-sample`)")
    p.add_argument("--seed", type=int, default=0, help="seed of the --keep-raw sample (default 0)")
    p.add_argument("--text-field", default="text", help="record field holding the text (default text)")
    p.add_argument("--split", default=None, help="split of a saved Hugging Face DatasetDict")
    p.add_argument("--merge", nargs="+", metavar="STATS", help="merge these statistics files into --output and exit")
    p.add_argument("--trust-remote-code", action="store_true", help="allow custom modeling code (off by default)")
    add_shard_arguments(p)


def check_options(args) -> None:
    """Flag values alone (no file access); `nexus pipeline` checks these before any stage runs."""
    check_shard_options(args, {"--merge": bool(args.merge), "--dequantize": args.dequantize})
    if args.merge:
        return
    if not args.model or not args.dataset:
        raise NexusError("--model and --dataset are required (or --merge FILES --output FILE)")
    for flag, value, low in (("--batch-size", args.batch_size, 1), ("--seq-len", args.seq_len, 1),
                             ("--flush-every", args.flush_every, 1), ("--target-tokens", args.target_tokens, 0),
                             ("--keep-raw", args.keep_raw, 0)):
        if value is not None and value < low:
            raise NexusError(f"{flag} must be at least {low}, got {value}")
    if args.keep_hidden and not args.keep_raw:
        raise NexusError("--keep-hidden keeps the hidden states of the --keep-raw sample: pass --keep-raw N too")


def _check_args(args) -> None:
    check_options(args)
    if args.merge:
        return
    if Path(args.output).exists() and not (args.overwrite or args.resume):
        raise NexusError(f"--output {args.output} exists (pass --overwrite to replace it)")
    partial = partial_path(args.output)
    if partial.is_file() and not (args.overwrite or args.resume):
        raise NexusError(f"{partial}: holds {partial_description(partial)} of an interrupted run; continue it with: "
                         f"{resume_command(args)} ; or start over with: "
                         f"{command(args, add=('--overwrite',), drop={'--resume': 0})}")


def resume_command(args) -> str:
    return command(args, add=("--resume",), drop={"--overwrite": 0})


def interrupted(args) -> str:
    """The Ctrl-C message: what the partial statistics hold and the command that continues them."""
    if args.merge:
        return f"nothing was written to {args.output}"
    partial = partial_path(args.output)
    if partial.is_file():
        return f"{partial} holds {partial_description(partial)}; continue with: {resume_command(args)}"
    return (f"nothing was saved yet (the first flush comes after --flush-every {args.flush_every} batches); "
            f"start again with: {command(args, drop={'--resume': 0})}")


def run(args) -> int:
    _check_args(args)
    if args.shard_base and not under_torchrun():
        return relaunch(args, "--shard-base")  # --shard-base stays on the relaunched command line
    return merge(args) if args.merge else collect(args)
