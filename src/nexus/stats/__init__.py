"""Router statistics stages: `sample` (pick representative documents), `collect` (streaming router
statistics per MoE layer) and `analyze` (PCA, expert importance and selection, plots)."""
