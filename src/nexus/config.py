"""The adapter config: one typed record of what an adapter is, written as `nexus_config.json`.

    cfg = NexusConfig.from_json_file("adapter/nexus_config.json")   # checked; errors name file and field
    cfg = dataclasses.replace(cfg, trainable_router=True)            # instances are frozen
    cfg.to_json_file("out/nexus_config.json")                        # atomic

A model with shared experts attached carries its config as `model.nexus_config`
(`nexus.shared.attach_shared_experts` sets it, `nexus.save_adapter` writes it). The JSON format is
versioned (`format`, `version`); keys that earlier versions wrote and nothing reads are accepted on
reading and not written again (`LEGACY_KEYS`). Anything else unknown, a missing required key, a
wrong type or a newer version is a one-line `NexusError` naming the file and the field.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, fields
from typing import Any

from .errors import NexusError
from .fsutil import read_json, write_json

CONFIG_NAME = "nexus_config.json"
FORMAT = "nexus-adapter"
VERSION = 1

# Written by earlier versions, read by nothing: accepted and dropped. "training" held the step and the
# run's output directory, which the checkpoint's trainer_state.json and its parent directory hold;
# init's "strategy", "scale" and "width_multiplier" repeated the top-level fields.
LEGACY_KEYS = frozenset({"training"})
LEGACY_INIT_KEYS = frozenset({"strategy", "scale", "width_multiplier"})


class ConfigError(NexusError):
    """A config field that is missing, unknown or of the wrong type; `field` is its dotted JSON path."""

    def __init__(self, field: str, problem: str, where: str = "NexusConfig"):
        self.field, self.problem = field, problem
        super().__init__(f"{where}: '{field}' {problem}")


# --- field checks: each returns the normalized value or raises ConfigError ---------------------------
def _shown(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (str, int, float, bool, type(None), list, dict)) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _int(name: str, value: Any, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(name, f"must be an integer, got {_shown(value)}")
    if value < minimum:
        raise ConfigError(name, f"must be at least {minimum}, got {value}")
    return value


def _number(name: str, value: Any, positive: bool = False) -> float:
    """A finite number (positive if asked); whole numbers come back as int (3.0 -> 3, as JSON wrote it)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(name, f"must be a finite number, got {_shown(value)}")
    if positive and value <= 0:
        raise ConfigError(name, f"must be positive, got {value}")
    return value


def _width(name: str, value: Any) -> float:
    value = _number(name, value, positive=True)
    return int(value) if value == int(value) else float(value)


def _str(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(name, f"must be a string, got {_shown(value)}")
    return value


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(name, f"must be true or false, got {_shown(value)}")
    return value


def _ints(name: str, value: Any) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(name, f"must be a list of integers, got {_shown(value)}")
    return tuple(_int(f"{name}[{i}]", v) for i, v in enumerate(value))


def _numbers(name: str, value: Any) -> tuple[float, ...]:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(name, f"must be a list of numbers, got {_shown(value)}")
    return tuple(_number(f"{name}[{i}]", v) for i, v in enumerate(value))


def _object(name: str, value: Any, known: set[str], required: set[str], legacy: frozenset = frozenset()) -> dict:
    """A JSON object with only `known` keys (and `legacy` ones, dropped) and all `required` ones."""
    if not isinstance(value, Mapping):
        raise ConfigError(name or "(top level)", f"must be a JSON object, got {_shown(value)}")
    unknown = sorted(set(value) - known - legacy)
    if unknown:
        raise ConfigError(f"{name}.{unknown[0]}" if name else unknown[0],
                          f"is not a field this NEXUS knows (known: {', '.join(sorted(known))})")
    missing = sorted(required - set(value))
    if missing:
        raise ConfigError(f"{name}.{missing[0]}" if name else missing[0], "is missing")
    return {k: v for k, v in value.items() if k in known}


# --- the config -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerInit:
    """How one MoE layer's shared expert was built by `nexus convert`."""

    layer: int  # decoder-layer index (a string key in JSON)
    experts: tuple[int, ...]  # routed experts merged, most important first
    weights: tuple[float, ...]  # their merge weights (sum 1)
    kept_units: tuple[int, ...] | None = None  # fractional width: hidden units of the merge that were kept

    def __post_init__(self):
        where = f"init.layers.{self.layer}"
        object.__setattr__(self, "layer", _int("init.layers", self.layer))
        object.__setattr__(self, "experts", _ints(f"{where}.experts", self.experts))
        object.__setattr__(self, "weights", _numbers(f"{where}.weights", self.weights))
        if len(self.weights) != len(self.experts):
            raise ConfigError(f"{where}.weights", f"has {len(self.weights)} entries for {len(self.experts)} experts")
        if self.kept_units is not None:
            object.__setattr__(self, "kept_units", _ints(f"{where}.kept_units", self.kept_units))

    def to_dict(self) -> dict:
        out = {"experts": list(self.experts), "weights": list(self.weights)}
        if self.kept_units is not None:
            out["kept_units"] = list(self.kept_units)
        return out


@dataclass(frozen=True)
class InitProvenance:
    """Where `nexus convert` took the shared experts' initial weights from (the strategy is
    `NexusConfig.init_strategy`)."""

    seed: int  # of the random parts (extra hidden units, random strategy)
    pca_stats: str | None = None  # the selection file, for strategies that merge experts
    layers: tuple[LayerInit, ...] = ()  # per MoE layer, for strategies that merge experts
    hidden_sample: str | None = None  # collect's raw sample whose hidden states ranked the kept units

    def __post_init__(self):
        object.__setattr__(self, "seed", _int("init.seed", self.seed))
        if self.pca_stats is not None:
            _str("init.pca_stats", self.pca_stats)
        if self.hidden_sample is not None:
            _str("init.hidden_sample", self.hidden_sample)
        object.__setattr__(self, "layers", tuple(self.layers))
        for lp in self.layers:
            if not isinstance(lp, LayerInit):
                raise ConfigError("init.layers", f"must hold LayerInit records, got {type(lp).__name__}")

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"seed": self.seed}
        if self.pca_stats is not None:
            out["pca_stats"] = self.pca_stats
        if self.layers:
            out["layers"] = {str(lp.layer): lp.to_dict() for lp in self.layers}
        if self.hidden_sample is not None:
            out["hidden_sample"] = self.hidden_sample
        return out

    @classmethod
    def from_dict(cls, data: Any) -> InitProvenance:
        data = _object("init", data, {"seed", "pca_stats", "layers", "hidden_sample"}, {"seed"}, LEGACY_INIT_KEYS)
        layers = []
        raw = data.get("layers", {})
        if not isinstance(raw, Mapping):
            raise ConfigError("init.layers", f"must be a JSON object keyed by layer, got {_shown(raw)}")
        for key, entry in raw.items():
            if not (isinstance(key, str) and key.isdigit()):
                raise ConfigError(f"init.layers.{key}", "is not a decoder-layer index")
            entry = _object(f"init.layers.{key}", entry, {"experts", "weights", "kept_units"}, {"experts", "weights"})
            layers.append(LayerInit(layer=int(key), **entry))
        return cls(seed=data["seed"], pca_stats=data.get("pca_stats"), layers=tuple(layers),
                   hidden_sample=data.get("hidden_sample"))


@dataclass(frozen=True, kw_only=True)
class NexusConfig:
    """What an adapter is: the base it was made for, the shape of its shared experts, how they were
    initialized. Field order is the JSON key order; fields without a default are required in the file."""

    base_model_name_or_path: str  # the base's path or hub id ("" when unknown; save_adapter records the model's)
    model_type: str  # the base's config.model_type
    moe_layers: tuple[int, ...]  # decoder-layer indices of the MoE blocks, in order
    num_experts: int  # routed experts per MoE layer
    intermediate_size: int  # the shared expert's hidden units (exact; width_multiplier's rounding applied)
    width_multiplier: float  # × the routed expert's intermediate size (may be fractional)
    init_strategy: str  # zero, random, tensors (Python API) or a convert strategy (pca_top24, ...)
    gate: bool = False  # a learnable scalar gate on each shared expert's output
    trainable_router: bool = False  # the adapter carries router weights (trained in some run)
    scale: float = 1.0  # multiplied into each shared expert's output at init
    nexus_version: str | None = None  # the NEXUS that wrote the file (save_adapter sets it)
    init: InitProvenance | None = None  # convert's record of the init

    def __post_init__(self):
        checks = {"base_model_name_or_path": _str, "model_type": _str, "moe_layers": _ints,
                  "num_experts": lambda n, v: _int(n, v, minimum=1),
                  "intermediate_size": lambda n, v: _int(n, v, minimum=1), "width_multiplier": _width,
                  "init_strategy": _str, "gate": _bool, "trainable_router": _bool, "scale": _number}
        for name, check in checks.items():
            object.__setattr__(self, name, check(name, getattr(self, name)))
        if not self.moe_layers:
            raise ConfigError("moe_layers", "is empty (an adapter has at least one MoE layer)")
        if self.nexus_version is not None:
            _str("nexus_version", self.nexus_version)
        if self.init is not None and not isinstance(self.init, InitProvenance):
            raise ConfigError("init", f"must be an InitProvenance, got {type(self.init).__name__}")

    # --- JSON round trip --------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """The JSON object of nexus_config.json: format, version, then the fields in order."""
        out: dict[str, Any] = {"format": FORMAT, "version": VERSION}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "init":
                if value is not None:
                    out["init"] = value.to_dict()
            else:
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def to_json_file(self, path: str | os.PathLike) -> None:
        """Write nexus_config.json atomically (complete under its name, or not there)."""
        write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, data: Any, source: str = "NexusConfig") -> NexusConfig:
        """Check and convert a nexus_config.json object; errors are one line starting with `source`."""
        try:
            if not isinstance(data, Mapping) or data.get("format") != FORMAT:
                shown = _shown(data.get("format")) if isinstance(data, Mapping) else "not a JSON object"
                raise NexusError(f"{source}: not a NEXUS adapter config ('format' is {shown}, expected '{FORMAT}')")
            version = _int("version", data.get("version"), minimum=1) if "version" in data else None
            if version is None:
                raise ConfigError("version", "is missing")
            if version > VERSION:
                raise ConfigError("version", f"is {version}: the adapter was written by a newer NEXUS; this one "
                                             f"reads up to version {VERSION} (upgrade NEXUS)")
            known = {f.name for f in fields(cls)} | {"format", "version"}
            required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
            values = _object("", data, known, required, LEGACY_KEYS)
            values.pop("format"), values.pop("version")
            if values.get("init") is not None:
                values["init"] = InitProvenance.from_dict(values["init"])
            return cls(**values)
        except ConfigError as e:
            raise ConfigError(e.field, e.problem, where=source) from None

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> NexusConfig:
        """Read and check nexus_config.json (errors name the file and the field)."""
        return cls.from_dict(read_json(path, "NEXUS adapter config"), source=str(path))
