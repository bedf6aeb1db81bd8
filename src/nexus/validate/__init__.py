"""Validation: how much an adapter changes the base model, measured on held-out data.

`metrics` holds the pure metric functions and `evaluate`; `report` writes report.json, report.md and
plots; `core` runs a validation (sequences, baseline, report); `cli` is the `nexus validate` verb.
"""

from .metrics import Totals, evaluate, kl_divergence, nll, perplexity, routing_agreement, token_nll

__all__ = ["Totals", "evaluate", "kl_divergence", "nll", "perplexity", "routing_agreement", "token_nll"]
