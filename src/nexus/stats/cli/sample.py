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
from ...flags import add_function_flags, function_args
from ...rerun import nothing_written
from ..sample import sample
from ..sampling import OBJECTIVES


FLAGS = {  # sample()'s parameters: their defaults and types are its signature's
    "dataset": {"help": "a .txt/.jsonl/.json/.parquet file, a folder of them, or a saved Hugging Face dataset"},
    "tokenizer": {"help": "model (or adapter) directory whose tokenizer to use"},
    "output": {"help": "JSONL file to write"},
    "target_tokens": {"help": "stop once the selection holds this many tokens"},
    "max_candidates": {"help": "documents drawn from the dataset as the candidate pool"},
    "seq_len": {"help": "truncate each document to this many tokens (default 1024, or the model's "
                        "max_position_embeddings when the --tokenizer directory holds a smaller one)"},
    "objective": {"choices": OBJECTIVES,
                  "help": "distribution: min KL(selected || pool) unigram; coverage: max distinct tokens"},
    "workers": {"help": "tokenizer threads"},
    "seed": {"help": "seed for drawing candidates"},
    "text_field": {"help": "record field holding the text (records with `messages` are chats)"},
    "split": {"help": "split of a saved Hugging Face DatasetDict (default train)"},
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_function_flags(p, sample, FLAGS)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")


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
    sample(**function_args(args, FLAGS))
    return 0
