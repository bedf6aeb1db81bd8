"""The verbs of the training stage: `train` and `plot-metrics` (one module each)."""
