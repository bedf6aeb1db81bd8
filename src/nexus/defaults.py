"""Defaults that depend on the model, taken from it unless the user gives a value.

A flag left unset (None) means "fit the model": a sequence length is the usual 1024 tokens, or the
model's `max_position_embeddings` when that is smaller (the bundled demo model has 256 positions);
a reply is at most 512 tokens and never runs past the context.
"""

from __future__ import annotations

import json
from pathlib import Path

DEFAULT_SEQ_LEN = 1024  # long enough for router statistics and distillation, short enough for memory
DEFAULT_MAX_NEW_TOKENS = 512


def max_positions(model_or_config) -> int | None:
    """The model's context length (`max_position_embeddings`), where its config has one."""
    config = getattr(model_or_config, "config", model_or_config)
    limit = getattr(config, "max_position_embeddings", None)
    return int(limit) if isinstance(limit, int) and limit > 0 else None


def max_positions_at(path: str | Path) -> int | None:
    """`max_position_embeddings` from a model directory's config.json, or its base's for an adapter
    directory, without loading anything else; None when it cannot be read (the later check names it)."""
    path = Path(path)
    try:
        if not (path / "config.json").is_file() and (path / "nexus_config.json").is_file():
            base = Path(json.loads((path / "nexus_config.json").read_text())["base_model_name_or_path"])
            path = path / base if not base.is_absolute() and (path / base).exists() else base
        limit = json.loads((path / "config.json").read_text()).get("max_position_embeddings")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return int(limit) if isinstance(limit, int) and limit > 0 else None


def seq_len_for(model_or_config, given: int | None) -> int:
    """`given`, or DEFAULT_SEQ_LEN capped at the positions of the model (a model, config or directory)."""
    if given is not None:
        return given
    limit = max_positions_at(model_or_config) if isinstance(model_or_config, (str, Path)) else \
        max_positions(model_or_config)
    return min(DEFAULT_SEQ_LEN, limit) if limit else DEFAULT_SEQ_LEN


SEQ_LEN_HELP = f"(default {DEFAULT_SEQ_LEN}, or the model's max_position_embeddings when smaller)"
