r"""Turn a base model into an adapter directory: shared experts initialized at random (the default) or from
its routed experts (those pca_stats.json selects).

    nexus convert --input path/to/gpt-oss-120b --output adapter/       # random init, the default
    nexus convert --input path/to/gpt-oss-120b --output adapter/ \
        --pca-stats pca_stats.json --init-strategy pca_top24
    nexus convert --input path/to/model --output adapter/ --init-strategy zero
    nexus convert ... --dry-run          # print the plan (experts, weights, bytes, memory); write nothing

Only the selected experts are read from the safetensors shards (memory-mapped; GPT-OSS MXFP4
decoded one expert at a time), so memory stays at about one layer's merge, never the whole model.
Init strategies: zero, random, pca_topK, frequency_topK (weighted average of the first K experts
pca_stats.json selects per layer, with its weights renormalized), aligned_topK (the same after
matching each expert's hidden units to the most important one's), concat_topK (the K experts side
by side: exactly Σ w_k E_k(x); the shared expert is K times wider), feature_topK (function-preserving:
the K experts' gate/up rows with the down projection zero, so outputs are unchanged at step 0; the
M × I units carrying the most weighted output at --width-multiplier M), pruned_topK (those units with
their down rows: concat_topK at any width). Which units carry the most output is measured on sampled
hidden states with --hidden-sample (mean |activation| × ‖weighted down row‖), else read off the weights. A sanity forward of the
converted model on a few tokens runs before the output directory appears (--skip-check when the
base does not fit in memory; every shared expert is still probed on random inputs).
"""

from __future__ import annotations

import argparse

from ..base.loader import DEQUANTIZE_HELP
from ..flags import add_function_flags, function_args
from ..rerun import nothing_written
from .core import convert
from .strategy import parse_strategy


FLAGS = {  # convert()'s parameters: their defaults and types are its signature's
    "input_dir": {"option": "--input", "metavar": "DIR",
                  "help": "base model directory (config.json + safetensors, single file or sharded)"},
    "output_dir": {"option": "--output", "metavar": "DIR",
                   "help": "adapter directory to write (must not exist unless --overwrite)"},
    "pca_stats": {"metavar": "FILE",
                  "help": "pca_stats.json from `nexus analyze` (or hand-written); needed by the merge strategies"},
    "hidden_sample": {"metavar": "FILE",
                      "help": "where convert keeps only some merged hidden units (feature_topK / pruned_topK below "
                              "width K, a merge below width 1): rank them by mean |activation| × ‖down row‖ over "
                              "the hidden states in FILE (the "
                              "<stats>.raw.safetensors of `nexus collect --keep-raw N --keep-hidden`); without it "
                              "units are ranked by their weights"},
    "init_strategy": {"metavar": "NAME",
                      "help": "zero | random | pca_topK | frequency_topK | aligned_topK | concat_topK | feature_topK | "
                              "pruned_topK (e.g. pca_top24); default random, the best or tied-best init in "
                              "docs/study.md, which needs no --pca-stats"},
    "width_multiplier": {"metavar": "M",
                         "help": "shared intermediate size = M × the routed expert's, e.g. 2 or 0.25 (default 1; "
                                 "concat_topK: K). Units beyond the merged expert start with random gate/up and "
                                 "zero down rows, so the output is unchanged; below 1, the merged expert's "
                                 "strongest hidden units are kept"},
    "scale": {"help": "multiply the shared expert's output at init"},
    "seed": {"help": "seed for random init and widening"},
    "dry_run": {"help": "print the plan and write nothing"},
    "check": {"negate": "--skip-check", "help": "skip the sanity forward through the full converted model "
                                                "(for bases that do not fit in memory)"},
    "gate": {"metavar": "G", "help": "add a learnable scalar on each shared expert's output, initialized to G "
                                     "(e.g. 0.1: the init's contribution starts small)"},
    "dequantize": {"help": "sanity check: " + DEQUANTIZE_HELP},
    "overwrite": {"help": "replace an existing output directory"},
}
ALIASES = {"--input": "--model", "--output": "--output-dir", "--pca-stats": "--router-stats"}


def check_options(args) -> None:
    """Flag values alone (no file access); `nexus pipeline` checks these before any stage runs."""
    parse_strategy(args.init_strategy)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_function_flags(p, convert, FLAGS, aliases=ALIASES)


def interrupted(args: argparse.Namespace) -> str:
    """The Ctrl-C message: the adapter directory is written atomically."""
    return nothing_written(args, args.output_dir)


def run(args: argparse.Namespace) -> int:
    convert(**function_args(args, FLAGS), log=lambda msg: print(msg, flush=True))
    return 0
