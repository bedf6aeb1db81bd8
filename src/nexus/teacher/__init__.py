"""`nexus precompute-teacher`: store a teacher's top-k next-token log-probabilities once, for offline
distillation (`nexus train --precomputed-teacher`). `cache` is the format, `precompute` the run."""
