r"""Turn a base model and pca_stats.json into an adapter directory (shared experts initialized from routed experts).

    nexus convert --input path/to/gpt-oss-120b --output adapter/ \
        --pca-stats pca_stats.json --init-strategy pca_top24
    nexus convert --input path/to/model --output adapter/ --init-strategy zero
    nexus convert ... --dry-run          # print the plan (experts, weights, bytes, memory); write nothing

Only the selected experts are read from the safetensors shards (memory-mapped; GPT-OSS MXFP4
decoded one expert at a time), so memory stays at about one layer's merge, never the whole model.
Init strategies: zero, random, pca_topK, frequency_topK (weighted average of the first K experts
pca_stats.json selects per layer, with its weights renormalized), aligned_topK (the same after
matching each expert's hidden units to the most important one's), concat_topK (the K experts side
by side: exactly Σ w_k E_k(x); the shared expert is K times wider). A sanity forward of the
converted model on a few tokens runs before the output directory appears (--skip-check when the
base does not fit in memory; every shared expert is still probed on random inputs).
"""

from __future__ import annotations

import argparse

from ..base.loader import DEQUANTIZE_HELP
from ..rerun import nothing_written
from .core import convert


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", "--model", dest="input", required=True, metavar="DIR",
                   help="base model directory (config.json + safetensors, single file or sharded)")
    p.add_argument("--output", "--output-dir", dest="output", required=True, metavar="DIR",
                   help="adapter directory to write (must not exist unless --overwrite)")
    p.add_argument("--pca-stats", "--router-stats", dest="pca_stats", metavar="FILE",
                   help="pca_stats.json from `nexus analyze` (or hand-written); needed by the merge strategies")
    p.add_argument("--init-strategy", required=True, metavar="NAME",
                   help="zero | random | pca_topK | frequency_topK | aligned_topK | concat_topK (e.g. pca_top24)")
    p.add_argument("--width-multiplier", type=float, default=None, metavar="M",
                   help="shared intermediate size = M × the routed expert's, e.g. 2 or 0.25 (default 1; concat_topK: "
                        "K). Units beyond the merged expert start with random gate/up and zero down rows, so the "
                        "output is unchanged; below 1, the merged expert's strongest hidden units are kept")
    p.add_argument("--scale", type=float, default=1.0, help="multiply the shared expert's output at init (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed for random init and widening (default 0)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and write nothing")
    p.add_argument("--skip-check", action="store_true",
                   help="skip the sanity forward through the full converted model "
                        "(for bases that do not fit in memory)")
    p.add_argument("--dequantize", action="store_true", help="sanity check: " + DEQUANTIZE_HELP)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")


interrupted = nothing_written  # the Ctrl-C message: the adapter directory is written atomically


def run(args: argparse.Namespace) -> int:
    convert(args.input, args.output, args.init_strategy, pca_stats=args.pca_stats,
            width_multiplier=args.width_multiplier, scale=args.scale, seed=args.seed,
            check=not args.skip_check, overwrite=args.overwrite, dry_run=args.dry_run,
            log=lambda msg: print(msg, flush=True), dequantize=args.dequantize)
    return 0
