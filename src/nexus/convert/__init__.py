"""The `convert` stage: a base model and pca_stats.json in, an adapter directory out.

`strategy` parses --init-strategy, `checkpoint` reads single experts from the shards, `merge` and
`assignment` combine them, `writer` / `fp8_writer` write tensors, `core` runs a conversion, `cli` is
the verb.
"""
