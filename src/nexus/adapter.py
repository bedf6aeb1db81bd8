"""Adapter directories: `nexus_config.json` (a `nexus.config.NexusConfig`) + `nexus_adapter.safetensors`.

Keys of the safetensors file are `<moe block path>.nexus_shared_expert.<param>`, plus router
parameters under their own names when they were trained. An adapter records the base it was made
for (`base_model_name_or_path`); `load_model` resolves it, loads the base the normal way, attaches
the shared experts and loads their weights.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .base.loader import check_model_path, load_base_model
from .config import CONFIG_NAME, FORMAT, VERSION, NexusConfig
from .errors import NexusError
from .fsutil import atomic_path
from .moe import find_moe_blocks
from .shared import SHARED_NAME, attach_shared_experts
from .sharding import like
from .version import __version__

WEIGHTS_NAME = "nexus_adapter.safetensors"


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable NEXUS weights: shared experts (and routers when trainable), by full name."""
    cfg = getattr(model, "nexus_config", None)
    if cfg is None:
        raise NexusError("model has no NEXUS shared experts attached")
    state = {}
    for name, p in model.named_parameters():
        if f".{SHARED_NAME}." in name:
            state[name] = p.detach()
    if cfg.trainable_router:
        for b in find_moe_blocks(model):
            for pname, p in b.router.named_parameters():
                state[f"{b.path}.{b.router_name}.{pname}"] = p.detach()
    return state


def save_adapter(model: nn.Module, directory: str | os.PathLike, state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the adapter of `model` to `directory` (created if needed; each file written atomically).

    `model.nexus_config` is written with the base the model was loaded from (resolved to an absolute
    path when it is a local directory) and this NEXUS's version. `state` gives the weights instead of
    the model's own (a sharded model's, gathered whole).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous().cpu() for k, v in (adapter_state_dict(model) if state is None else state).items()}
    base = getattr(model.config, "_name_or_path", None) or getattr(model, "name_or_path", "")
    if base and Path(base).exists():
        base = str(Path(base).resolve())
    config = replace(model.nexus_config, base_model_name_or_path=base, nexus_version=__version__)
    with atomic_path(directory / WEIGHTS_NAME) as tmp:
        save_file(state, str(tmp), metadata={"format": FORMAT, "version": str(VERSION)})
    config.to_json_file(directory / CONFIG_NAME)
    return directory


def is_adapter_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / CONFIG_NAME).is_file()


def read_adapter_config(directory: str | os.PathLike) -> NexusConfig:
    """Read and check `nexus_config.json` of an adapter directory."""
    return NexusConfig.from_json_file(Path(directory) / CONFIG_NAME)


def resolve_base(adapter_dir: Path, recorded: str) -> str:
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
            expected[name].copy_(like(t, expected[name]))  # a sharded parameter takes its rows


def attach_from_config(model: nn.Module, cfg: NexusConfig, source: str = "adapter") -> nn.Module:
    """Attach shared experts shaped as `cfg` describes, after checking it fits `model`.

    The shared experts start at zero (load their weights next); `model.nexus_config` is `cfg`, so
    the adapter's record of its init is kept when the model is saved again.
    """
    model_type = getattr(model.config, "model_type", None)
    if cfg.model_type != model_type:
        raise NexusError(f"{source}: made for model_type '{cfg.model_type}', but the base is '{model_type}'")
    blocks = find_moe_blocks(model)
    layers = [b.layer for b in blocks]
    if list(cfg.moe_layers) != layers:
        raise NexusError(f"{source}: made for MoE layers {list(cfg.moe_layers)}, but the base has MoE layers {layers}")
    if cfg.num_experts != blocks[0].layout.num_experts:
        raise NexusError(f"{source}: made for {cfg.num_experts} experts per layer, the base has "
                         f"{blocks[0].layout.num_experts}")
    attach_shared_experts(model, init="zero", width_multiplier=cfg.width_multiplier,
                          intermediate_size=cfg.intermediate_size, gate=cfg.gate,
                          trainable_router=cfg.trainable_router)
    model.nexus_config = cfg
    return model


def load_model(path: str | os.PathLike, dtype=None, device_map=None, base_model: str | None = None,
               trust_remote_code: bool = False, dequantize: bool = False) -> nn.Module:
    """Load an adapter directory (its base resolved and loaded, shared experts attached) or a plain model.

    Args:
        path: adapter directory or transformers model directory.
        dtype: dtype of the base weights (e.g. torch.bfloat16); shared experts stay fp32.
        device_map: passed to `from_pretrained`.
        base_model: use this base instead of the one the adapter records.
        dequantize: load a quantized base dequantized (transformers' load) instead of keeping it packed.
    """
    path = Path(check_model_path(path)) if Path(path).exists() else check_model_path(path)
    if not is_adapter_dir(path):
        return load_base_model(str(path), dtype=dtype, device_map=device_map, trust_remote_code=trust_remote_code,
                               dequantize=dequantize)
    cfg = read_adapter_config(path)
    base = base_model or resolve_base(Path(path), cfg.base_model_name_or_path)
    model = load_base_model(base, dtype=dtype, device_map=device_map, trust_remote_code=trust_remote_code,
                            what=f"base model of adapter {path}", dequantize=dequantize)
    attach_from_config(model, cfg, source=str(Path(path) / CONFIG_NAME))
    load_adapter_weights(model, path)
    return model


def load_sharded_model(path: str | os.PathLike, device: torch.device, dtype=None, base_model: str | None = None,
                       trust_remote_code: bool = False, what: str = "--model") -> tuple[nn.Module, nn.Module]:
    """`load_model` for `--shard-base`: (model, FSDP2 root), the base sharded over the torchrun ranks.

    Built on the meta device, the adapter's shared experts attached, sharded (`nexus.sharding.shard_model`),
    then each rank reads only its rows of the checkpoint and the adapter's. Every forward goes through the
    root: `root(ids, mask)` gives the final hidden states, `root(ids, mask, logits=True)` the logits, and
    every rank must run the same number of forwards (each gathers layers from all ranks).
    """
    from .base.cpu_matmul import compute_frozen_linears_in_fp32
    from .base.loader import build_on_meta, materialize_sharded
    from .sharding import shard_model

    path = Path(check_model_path(path)) if Path(path).exists() else check_model_path(path)
    adapter = is_adapter_dir(path)
    cfg = read_adapter_config(path) if adapter else None
    base = (base_model or resolve_base(Path(path), cfg.base_model_name_or_path)) if adapter else str(path)
    model, plan = build_on_meta(base, dtype=dtype, trust_remote_code=trust_remote_code,
                                what=f"base model of adapter {path}" if adapter else what)
    compute_frozen_linears_in_fp32(model)
    if adapter:
        attach_from_config(model, cfg, source=str(Path(path) / CONFIG_NAME))
        for p in model.parameters():
            p.requires_grad_(False)
    root = shard_model(model, device)
    materialize_sharded(model, plan, device)
    if adapter:
        load_adapter_weights(model, path)
    return model, root
