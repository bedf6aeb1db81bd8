"""Adapter directories: `nexus_config.json` + `nexus_adapter.safetensors`.

Keys of the safetensors file are `<moe block path>.nexus_shared_expert.<param>`, plus router
parameters under their own names when they were trained. An adapter records the base it was made
for (`base_model_name_or_path`); `load_model` resolves it, loads the base the normal way, attaches
the shared experts and loads their weights.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__
from .errors import NexusError
from .fsutil import atomic_path, read_json, write_json
from .moe import find_moe_blocks
from .shared import SHARED_NAME, attach_shared_experts

CONFIG_NAME = "nexus_config.json"
WEIGHTS_NAME = "nexus_adapter.safetensors"
FORMAT = "nexus-adapter"
VERSION = 1
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable NEXUS weights: shared experts (and routers when trainable), by full name."""
    cfg = getattr(model, "_nexus_config", None)
    if cfg is None:
        raise NexusError("model has no NEXUS shared experts attached")
    state = {}
    for name, p in model.named_parameters():
        if f".{SHARED_NAME}." in name:
            state[name] = p.detach()
    if cfg["trainable_router"]:
        for b in find_moe_blocks(model):
            for pname, p in b.router.named_parameters():
                state[f"{b.path}.{b.router_name}.{pname}"] = p.detach()
    return state


def save_adapter(model: nn.Module, directory: str | os.PathLike, extra_config: dict | None = None) -> Path:
    """Write the adapter of `model` to `directory` (created if needed; each file written atomically)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = dict(model._nexus_config)
    base = getattr(model.config, "_name_or_path", None) or getattr(model, "name_or_path", "")
    if base and Path(base).exists():
        base = str(Path(base).resolve())
    config = {"format": FORMAT, "version": VERSION, "base_model_name_or_path": base, **cfg,
              "nexus_version": __version__}
    if extra_config:
        config.update(extra_config)
    state = {k: v.contiguous().cpu() for k, v in adapter_state_dict(model).items()}
    with atomic_path(directory / WEIGHTS_NAME) as tmp:
        save_file(state, str(tmp), metadata={"format": FORMAT, "version": str(VERSION)})
    write_json(directory / CONFIG_NAME, config)
    return directory


def is_adapter_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / CONFIG_NAME).is_file()


def read_adapter_config(directory: str | os.PathLike) -> dict:
    """Read and check `nexus_config.json`."""
    cfg = read_json(Path(directory) / CONFIG_NAME, "NEXUS adapter config")
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        raise NexusError(f"{Path(directory) / CONFIG_NAME}: not a NEXUS adapter config (format != '{FORMAT}')")
    if int(cfg.get("version", 0)) > VERSION:
        raise NexusError(f"{Path(directory) / CONFIG_NAME}: adapter format version {cfg['version']} is newer "
                         f"than this NEXUS understands ({VERSION})")
    for key in ("base_model_name_or_path", "model_type", "moe_layers", "width_multiplier"):
        if key not in cfg:
            raise NexusError(f"{Path(directory) / CONFIG_NAME}: missing '{key}'")
    return cfg


def _is_hub_name(path: str) -> bool:
    """`org/name` that is not a local path: no `.`, `/` or `~` start, and `org` is no local directory.

    A name like `runs/adapter` whose first part exists here is a (missing) local path, never a hub
    request: NEXUS goes to the network only for a name that cannot be meant locally.
    """
    if not _HUB_NAME.match(path) or path.startswith((".", "~")):
        return False
    return not Path(path.split("/", 1)[0]).exists()


def check_model_path(path: str | os.PathLike, what: str = "--model", need_config: bool = True) -> str:
    """A local model directory (with config.json), or a hub name `org/name` the user asked for.

    `need_config=False` accepts any directory (a tokenizer directory holds no config.json).
    """
    p = Path(path)
    if p.is_dir():
        if need_config and not (p / "config.json").is_file() and not is_adapter_dir(p):
            raise NexusError(f"{what} {path}: directory holds no config.json (not a transformers model "
                             f"directory) and no {CONFIG_NAME} (not a NEXUS adapter)")
        return str(p)
    if p.exists():
        raise NexusError(f"{what} {path}: expected a model directory, got a file")
    if _is_hub_name(str(path)):
        return str(path)  # a hub name: transformers resolves (and may download) it
    raise NexusError(f"{what} {path}: no such directory")


def check_model_type(path: str | os.PathLike, what: str = "--model", trust_remote_code: bool = False) -> None:
    """Refuse a local model whose config.json names a family this transformers does not know.

    Without this, transformers reports custom code or an unknown architecture in terms of
    repositories; the message here names the model type, the flag and what NEXUS supports.
    """
    config = Path(path) / "config.json"
    if not config.is_file():
        return
    try:
        cfg = json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NexusError(f"{what} {path}: config.json is not valid JSON ({e})") from None
    check_config_model_type(cfg, f"{what} {path}", trust_remote_code)


def check_config_model_type(cfg: dict, where: str, trust_remote_code: bool = False) -> None:
    """The check of `check_model_type` on an already parsed config.json; `where` starts the message."""
    from transformers import CONFIG_MAPPING
    from transformers import __version__ as tf_version

    model_type = cfg.get("model_type") if isinstance(cfg, dict) else None
    if not model_type or model_type in CONFIG_MAPPING:
        return
    custom = "auto_map" in cfg
    if custom and trust_remote_code:
        return
    from .moe import SUPPORTED_FAMILIES

    hint = ("; its config.json asks for custom modeling code (auto_map), which NEXUS runs only with "
            "--trust-remote-code, on the stages that offer it" if custom else "")
    raise NexusError(f"{where}: model_type '{model_type}' is not a model family transformers {tf_version} "
                     f"knows{hint}. Supported families: {', '.join(SUPPORTED_FAMILIES)}")


def load_base_model(path: str, dtype=None, device_map=None, trust_remote_code: bool = False, what="--model"):
    """Load a plain transformers causal LM; errors name the path."""
    from transformers import AutoModelForCausalLM

    path = check_model_path(path, what)
    check_model_type(path, what, trust_remote_code)
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=device_map,
                                                    trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, SafetensorError) as e:
        where = "" if Path(path).exists() else " (not a local directory; tried as a hub model name)"
        raise NexusError(f"{what} {path}: cannot load model{where} "
                         f"({type(e).__name__}: {str(e).splitlines()[0]})") from e


def _resolve_base(adapter_dir: Path, recorded: str) -> str:
    if not recorded:
        raise NexusError(f"{adapter_dir / CONFIG_NAME}: no base_model_name_or_path recorded; pass --base-model")
    p = Path(recorded)
    if not p.is_absolute() and (adapter_dir / p).exists():
        return str((adapter_dir / p).resolve())
    return recorded


def load_adapter_weights(model: nn.Module, directory: str | os.PathLike) -> None:
    """Load `nexus_adapter.safetensors` into a model with matching shared experts attached."""
    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        raise NexusError(f"{path}: adapter weights missing")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise NexusError(f"{path}: not a readable safetensors file ({e})") from None
    expected = adapter_state_dict(model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise NexusError(f"{path}: adapter does not match the model "
                         f"(missing {missing[:3]}{'…' if len(missing) > 3 else ''}, "
                         f"unexpected {unexpected[:3]}{'…' if len(unexpected) > 3 else ''})")
    for name, t in state.items():
        if tuple(t.shape) != tuple(expected[name].shape):
            raise NexusError(f"{path}: '{name}' has shape {tuple(t.shape)}, the model expects "
                             f"{tuple(expected[name].shape)}")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise NexusError(f"{path}: '{name}' holds NaN or infinite values; the adapter is damaged "
                             f"(load an earlier checkpoint)")
    with torch.no_grad():
        for name, t in state.items():
            expected[name].copy_(t)


def attach_from_config(model: nn.Module, cfg: dict, source: str = "adapter") -> nn.Module:
    """Attach shared experts shaped as `cfg` describes, after checking it fits `model`."""
    model_type = getattr(model.config, "model_type", None)
    if cfg["model_type"] != model_type:
        raise NexusError(f"{source}: made for model_type '{cfg['model_type']}', but the base is '{model_type}'")
    layers = [b.layer for b in find_moe_blocks(model)]
    if list(cfg["moe_layers"]) != layers:
        raise NexusError(f"{source}: made for MoE layers {cfg['moe_layers']}, but the base has MoE layers {layers}")
    if "num_experts" in cfg and cfg["num_experts"] != find_moe_blocks(model)[0].layout.num_experts:
        raise NexusError(f"{source}: made for {cfg['num_experts']} experts per layer, the base has "
                         f"{find_moe_blocks(model)[0].layout.num_experts}")
    attach_shared_experts(model, init="zero", width_multiplier=cfg["width_multiplier"],
                          gate=cfg.get("gate", False), trainable_router=cfg.get("trainable_router", False))
    model._nexus_config.update({k: cfg[k] for k in ("init_strategy", "scale") if k in cfg})
    return model


def load_model(path: str | os.PathLike, dtype=None, device_map=None, base_model: str | None = None,
               trust_remote_code: bool = False) -> nn.Module:
    """Load an adapter directory (its base resolved and loaded, shared experts attached) or a plain model.

    Args:
        path: adapter directory or transformers model directory.
        dtype: dtype of the base weights (e.g. torch.bfloat16); shared experts stay fp32.
        device_map: passed to `from_pretrained`.
        base_model: use this base instead of the one the adapter records.
    """
    path = Path(check_model_path(path)) if Path(path).exists() else check_model_path(path)
    if not is_adapter_dir(path):
        return load_base_model(str(path), dtype=dtype, device_map=device_map, trust_remote_code=trust_remote_code)
    cfg = read_adapter_config(path)
    base = base_model or _resolve_base(Path(path), cfg["base_model_name_or_path"])
    model = load_base_model(base, dtype=dtype, device_map=device_map, trust_remote_code=trust_remote_code,
                            what=f"base model of adapter {path}")
    attach_from_config(model, cfg, source=str(Path(path) / CONFIG_NAME))
    load_adapter_weights(model, path)
    model._nexus_adapter_path = str(path)
    return model
