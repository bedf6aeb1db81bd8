"""Router statistics stages: `sample` (pick representative documents), `collect` (streaming router
statistics per MoE layer) and `analyze` (PCA, expert importance and selection, plots); their verbs
are `cli.sample`, `cli.collect` and `cli.analyze`."""
