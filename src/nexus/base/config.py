"""The transformers config of a local model, read without its weights.

    config = load_model_config("path/to/gpt-oss-120b", what="--input")   # a directory
    config = load_model_config("config.json")                           # or a bare config.json

One reader for every stage that needs a model's shape before (or instead of) its weights: `plan`,
`convert`, `analyze`. Errors name the flag (`what`) and the path; nothing is fetched from a hub.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import NexusError
from .loader import check_config_model_type, is_hub_name


def load_model_config(path: str | os.PathLike, what: str = "--model", trust_remote_code: bool = False):
    """A transformers config from a model directory or a bare config.json.

    A family this transformers does not know is refused by name (custom code only with
    `trust_remote_code`); a hub name gets the command that downloads its config.
    """
    from transformers import AutoConfig

    given, path = str(path), Path(path)
    file = path / "config.json" if path.is_dir() else path
    if path.is_dir() and not file.is_file():
        raise NexusError(f"{what} {path}: no config.json (not a transformers model directory)")
    if not file.is_file():
        if is_hub_name(given):
            raise NexusError(f"{what} {path}: no such local directory; a hub name is not fetched (nexus reads no "
                             f"network): download its config first, e.g. `hf download {path} config.json "
                             f"--local-dir {path.name}`, then pass {what} {path.name}")
        raise NexusError(f"{what} {path}: no such model directory or config.json")
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        where = f"{what} {path}: config.json is" if file != path else f"{what} {path}:"
        raise NexusError(f"{where} not valid JSON ({e})") from None
    model_type = data.get("model_type") if isinstance(data, dict) else None
    if not model_type:
        raise NexusError(f"{what} {path}: config has no 'model_type'")
    check_config_model_type(data, f"{what} {path}", trust_remote_code)
    if file != path or ("auto_map" in data and trust_remote_code):  # a directory: transformers reads it itself
        try:
            return AutoConfig.from_pretrained(str(file.parent), trust_remote_code=trust_remote_code)
        except (OSError, ValueError, KeyError, ImportError) as e:
            first_line = str(e).splitlines()[0] if str(e) else ""
            raise NexusError(f"{what} {path}: cannot read config.json ({type(e).__name__}: {first_line})") from None
    data.pop("model_type")
    try:
        return AutoConfig.for_model(model_type, **data)
    except ValueError as e:
        raise NexusError(f"{what} {path}: unknown model_type '{model_type}' ({e})") from None
