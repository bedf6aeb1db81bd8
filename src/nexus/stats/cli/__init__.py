"""The verbs of the router statistics stage: `sample`, `collect`, `analyze` (one module each)."""
