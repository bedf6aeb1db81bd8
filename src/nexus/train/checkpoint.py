"""Training checkpoints: an adapter directory plus what resuming exactly needs.

    checkpoint-N/
      nexus_config.json, nexus_adapter.safetensors   the adapter (trainable weights only)
      trainer_state.json                             step, data position, router freeze state, ...
      optimizer.pt                                   AdamW state (torch.save; read with weights_only=True)
      rng_state.pt                                   torch / CUDA / Python RNG states, one per rank
      master_weights.safetensors                     fp32 masters of non-fp32 trainable weights (if any)
      sfa_anchor.safetensors                         the SFA anchor (if SFA is on)

The schedule has no state of its own: it is a pure function of the step in trainer_state.json.
Each checkpoint directory is written atomically (complete, or absent).
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..adapter import save_adapter
from ..errors import NexusError
from ..fsutil import atomic_dir, read_json, torch_save, write_json

STATE = "trainer_state.json"
OPTIMIZER = "optimizer.pt"
RNG = "rng_state.pt"
MASTERS = "master_weights.safetensors"
ANCHOR = "sfa_anchor.safetensors"
_CKPT = re.compile(r"^checkpoint-(\d+)$")
_STATE_KEYS = ("step", "global_batch", "data_fingerprint", "seed", "trainable_parameters", "router")


def checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in `output_dir`, oldest first."""
    out = []
    d = Path(output_dir)
    if d.is_dir():
        for p in d.iterdir():
            m = _CKPT.match(p.name)
            if m and p.is_dir() and (p / STATE).is_file():
                out.append((int(m.group(1)), p))
    return sorted(out)


def resolve_resume(arg: str, output_dir: str | Path) -> Path | None:
    """`latest` -> the newest checkpoint of `output_dir` (None when there is none yet), else the path."""
    if arg == "latest":
        found = checkpoints(output_dir)
        return found[-1][1] if found else None
    p = Path(arg)
    if not (p / STATE).is_file():
        raise NexusError(f"--resume-from-checkpoint {arg}: not a training checkpoint (no {STATE})")
    return p


def capture_rng() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(path: Path, model, trainer_state: dict, optimizer_state: dict | None = None,
         rng_states: list[dict] | None = None, masters: dict[str, torch.Tensor] | None = None,
         anchor: dict[str, torch.Tensor] | None = None, adapter: dict[str, torch.Tensor] | None = None) -> Path:
    """Write `path` atomically (an existing one, e.g. from an interrupted run, is replaced).

    `final/` passes only the adapter and the trainer state: it is a result, not a resume point.
    `adapter`: the adapter weights, when not the model's own (a sharded model's, gathered).
    """
    with atomic_dir(path, overwrite=True) as tmp:
        save_adapter(model, tmp, adapter)
        write_json(tmp / STATE, trainer_state)
        if optimizer_state is not None:
            torch_save(optimizer_state, tmp / OPTIMIZER)
        if rng_states is not None:
            torch_save(rng_states, tmp / RNG)
        if masters:
            save_file({k: v.contiguous().cpu() for k, v in masters.items()}, str(tmp / MASTERS))
        if anchor:
            save_file({k: v.contiguous().cpu() for k, v in anchor.items()}, str(tmp / ANCHOR))
    return path


def load(path: Path) -> dict:
    """Everything `save` wrote except the adapter weights (load those with `load_adapter_weights`)."""
    state = read_json(path / STATE, "trainer state")
    missing = [k for k in _STATE_KEYS if k not in state] if isinstance(state, dict) else list(_STATE_KEYS)
    if missing:
        raise NexusError(f"{path / STATE}: not a NEXUS trainer state (missing {', '.join(missing)})")
    if not (path / OPTIMIZER).is_file():
        raise NexusError(f"{path}: no {OPTIMIZER}; only checkpoint-N directories can be resumed from")
    return {"state": state, "optimizer": _torch_load(path / OPTIMIZER, "optimizer state"),
            "rng": _torch_load(path / RNG, "RNG state") if (path / RNG).is_file() else None,
            "masters": _safetensors_load(path / MASTERS) if (path / MASTERS).is_file() else {},
            "anchor": _safetensors_load(path / ANCHOR) if (path / ANCHOR).is_file() else None}


def _torch_load(path: Path, what: str):
    """NEXUS's own torch.save files, as plain tensors and containers only: never arbitrary pickles."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any failure (I/O, a damaged archive, a refused pickle) means: not our file
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        if reason.startswith("Weights only load failed"):
            reason = "not tensors and plain containers; NEXUS never unpickles anything else"
        raise NexusError(f"{path}: not a NEXUS {what} ({reason[:200]})") from None


def _safetensors_load(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise NexusError(f"{path}: not a readable safetensors file ({e})") from None


def rotate(output_dir: str | Path, keep: int | None) -> list[Path]:
    """Delete all but the newest `keep` checkpoints; returns what was removed."""
    if not keep or keep < 1:
        return []
    found = checkpoints(output_dir)
    removed = [p for _, p in found[:-keep]]
    for p in removed:
        # Renamed first: a kill during the deletion leaves a hidden leftover, never a half-deleted checkpoint-N.
        doomed = p.with_name(f".{p.name}.deleting")
        shutil.rmtree(doomed, ignore_errors=True)
        os.replace(p, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    return removed
