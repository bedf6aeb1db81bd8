"""Distribution-aware sampling: pick documents whose tokens represent the whole dataset.

    nexus sample --dataset data/ --tokenizer path/to/model --target-tokens 1000000 --output sample.jsonl
    nexus sample --dataset chats.jsonl --tokenizer path/to/model --objective coverage --workers 4

Up to --max-candidates documents are drawn (uniformly at random with --seed when the dataset holds
more), rendered (chat records through the tokenizer's chat template), tokenized and truncated to
--seq-len tokens. Then candidates are added greedily until the selection holds --target-tokens:
`--objective distribution` (default, what the original tool did) minimizes KL(selected unigram ||
pool unigram); `--objective coverage` maximizes the number of distinct token ids covered. Ties go
to the lowest candidate index, so a run is reproducible.

Output: one JSON record per selected document, in the order picked (the most representative
first, so any prefix is itself a good sample): {"text", "tokens", "source_index", "source"}.
`text` is cut at the end of the last kept token when a document was truncated; `tokens` counts
its tokens without special tokens. `nexus collect --dataset sample.jsonl` reads it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ...defaults import seq_len_for
from ...errors import NexusError
from ...rerun import nothing_written
from ..sample import sample
from ..sampling import OBJECTIVES


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", required=True,
                   help="a .txt/.jsonl/.json/.parquet file, a folder of them, or a saved Hugging Face dataset")
    p.add_argument("--tokenizer", required=True, help="model (or adapter) directory whose tokenizer to use")
    p.add_argument("--output", default="sample.jsonl", help="JSONL file to write (default sample.jsonl)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--target-tokens", type=int, default=1_000_000,
                   help="stop once the selection holds this many tokens (default 1000000)")
    p.add_argument("--max-candidates", type=int, default=10_000,
                   help="documents drawn from the dataset as the candidate pool (default 10000)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="truncate each document to this many tokens (default 1024, or the model's "
                        "max_position_embeddings when the --tokenizer directory holds a smaller one)")
    p.add_argument("--objective", choices=OBJECTIVES, default="distribution",
                   help="distribution: min KL(selected || pool) unigram (default); coverage: max distinct tokens")
    p.add_argument("--workers", type=int, default=1, help="tokenizer threads (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed for drawing candidates (default 0)")
    p.add_argument("--text-field", default="text",
                   help="record field holding the text (default text; records with `messages` are chats)")
    p.add_argument("--split", default=None, help="split of a saved Hugging Face DatasetDict (default train)")


def check_options(args) -> None:
    """Flag values alone (no file access); `nexus pipeline` checks these before any stage runs."""
    for flag, value, low in (("--target-tokens", args.target_tokens, 1), ("--max-candidates", args.max_candidates, 1),
                             ("--seq-len", args.seq_len, 1), ("--workers", args.workers, 1)):
        if value is not None and value < low:
            raise NexusError(f"{flag} must be at least {low}, got {value}")


def _check_args(args) -> None:
    check_options(args)
    args.seq_len = seq_len_for(args.tokenizer, args.seq_len)
    if Path(args.output).exists() and not args.overwrite:
        raise NexusError(f"--output {args.output} exists (pass --overwrite to replace it)")


interrupted = nothing_written  # the Ctrl-C message: the output is written atomically


def run(args) -> int:
    _check_args(args)
    sample(args.dataset, args.tokenizer, args.output, args.target_tokens, args.max_candidates, args.seq_len,
           args.objective, args.workers, args.seed, args.text_field, args.split)
    return 0
