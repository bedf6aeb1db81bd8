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

from .cli import add_arguments, interrupted, run

__all__ = ["add_arguments", "interrupted", "run"]
