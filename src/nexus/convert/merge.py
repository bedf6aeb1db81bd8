"""Merging routed experts into one shared expert: weighted average, aligned average, concatenation.

All strategies work on a layout-free "units" view of an expert: its I hidden units (intermediate
neurons), each owning a gate row, an up row and a down row, whatever the family's storage:

    gate, up:  [I, H]   (rows of gate_up_proj / up_proj; GPT-OSS interleaves gate and up columns)
    down:      [I, H]   (rows of down_proj in GPT-OSS's [I, H]; columns of [H, I] elsewhere)
    gate_bias, up_bias: [I]      down_bias: [H]   (when the family has biases)

Experts are fed one at a time (`add`), so a merge holds its accumulator plus the expert being added,
never all K experts (concat holds its K·I-wide output, which is the result itself).
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import NexusError
from ..moe import ExpertsLayout
from .assignment import linear_assignment

UNIT_KEYS = ("gate", "up", "down", "gate_bias", "up_bias")  # indexed by hidden unit along dim 0


def to_units(expert: dict[str, torch.Tensor], layout: ExpertsLayout) -> dict[str, torch.Tensor]:
    """One expert in the family layout (parameter shapes minus the expert dim) -> units view (may share memory)."""
    known = {layout.up_name, "down_proj", f"{layout.up_name}_bias", "down_proj_bias"}
    if set(expert) - known:
        raise NexusError(f"expert parameters {sorted(set(expert) - known)} are not gate/up/down projections or "
                         f"their biases; convert cannot merge them")
    up = expert[layout.up_name]
    rows = up.T if layout.is_transposed else up  # [2I or I, H]
    down = expert["down_proj"]
    units = {"down": down if layout.is_transposed else down.T}  # [I, H]
    inter = units["down"].shape[0]
    up_bias = expert.get(f"{layout.up_name}_bias")
    if layout.has_gate:
        split = (lambda t: (t[:inter], t[inter:])) if layout.is_concatenated else (lambda t: (t[0::2], t[1::2]))
        units["gate"], units["up"] = split(rows)
        if up_bias is not None:
            units["gate_bias"], units["up_bias"] = split(up_bias)
    else:
        units["up"] = rows
        if up_bias is not None:
            units["up_bias"] = up_bias
    if "down_proj_bias" in expert:
        units["down_bias"] = expert["down_proj_bias"]
    return units


def from_units(units: dict[str, torch.Tensor], layout: ExpertsLayout) -> dict[str, torch.Tensor]:
    """Units view -> parameters of a one-expert module in the family layout ([1, ...], contiguous)."""

    def join(gate, up):  # [I, ...] twice -> [2I, ...]
        if layout.is_concatenated:
            return torch.cat([gate, up], dim=0)
        return torch.stack([gate, up], dim=1).reshape(2 * gate.shape[0], *gate.shape[1:])  # g0, u0, g1, u1, ...

    rows = join(units["gate"], units["up"]) if layout.has_gate else units["up"]
    out = {layout.up_name: rows.T if layout.is_transposed else rows,
           "down_proj": units["down"] if layout.is_transposed else units["down"].T}
    if "up_bias" in units:
        bias = join(units["gate_bias"], units["up_bias"]) if layout.has_gate else units["up_bias"]
        out[f"{layout.up_name}_bias"] = bias
    if "down_bias" in units:
        out["down_proj_bias"] = units["down_bias"]
    return {k: v.unsqueeze(0).contiguous() for k, v in out.items()}


def unit_features(units: dict[str, torch.Tensor]) -> np.ndarray:
    """[I, F] float64: everything a hidden unit owns, side by side (what alignment compares)."""
    cols = [units[k].reshape(units[k].shape[0], -1) for k in UNIT_KEYS if k in units]
    return torch.cat(cols, dim=1).double().numpy()


def match_units(anchor: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> torch.Tensor:
    """Permutation p [I] such that unit p[u] of `other` best matches unit u of `anchor`.

    Maximizes Σ_u <f_anchor[u], f_other[p[u]]> over permutations, i.e. minimizes the total squared
    distance between matched units' weights (weight matching, as MC-SMoE aligns experts).
    """
    similarity = unit_features(anchor) @ unit_features(other).T  # [I, I]
    return torch.from_numpy(linear_assignment(-similarity))


def permute_units(units: dict[str, torch.Tensor], perm: torch.Tensor) -> dict[str, torch.Tensor]:
    """Reorder hidden units: gate/up rows (and their biases) and down rows move together."""
    return {k: (v.index_select(0, perm) if k in UNIT_KEYS else v) for k, v in units.items()}


class Average:
    """Running weighted sum Σ wₖ Eₖ of experts (weights summing to 1 make it the average)."""

    def __init__(self):
        self.acc: dict[str, torch.Tensor] | None = None

    def add(self, units: dict[str, torch.Tensor], weight: float) -> None:
        if self.acc is None:
            self.acc = {k: v.float() * weight for k, v in units.items()}
        else:
            for k, v in units.items():
                self.acc[k].add_(v.float(), alpha=weight)

    def result(self) -> dict[str, torch.Tensor]:
        return self.acc


class AlignedAverage(Average):
    """Average after permuting each expert's hidden units to match the first (most important) expert's."""

    def __init__(self):
        super().__init__()
        self.anchor: dict[str, torch.Tensor] | None = None

    def add(self, units: dict[str, torch.Tensor], weight: float) -> None:
        if self.anchor is None:
            self.anchor = {k: v.float().clone() for k, v in units.items()}
        else:
            units = permute_units(units, match_units(self.anchor, units))
        super().add(units, weight)


class Concat:
    """K experts side by side in one K·I-wide expert; weights folded into the down projection.

    out(x) = Σₖ wₖ (downₖ hₖ(x) + bₖ) = [w₁down₁ … w_Kdown_K] [h₁(x); …; h_K(x)] + Σₖ wₖbₖ, exactly.
    """

    def __init__(self, k: int):
        self.k, self.pos, self.acc = k, 0, None

    def add(self, units: dict[str, torch.Tensor], weight: float) -> None:
        inter = units["down"].shape[0]
        if self.acc is None:
            self.acc = {key: torch.zeros(self.k * inter, *v.shape[1:]) if key in UNIT_KEYS else torch.zeros(v.shape)
                        for key, v in units.items()}  # [K·I, H] / [K·I] per unit piece, [H] for the down bias
        rows = slice(self.pos * inter, (self.pos + 1) * inter)
        for key, v in units.items():
            if key == "down":
                self.acc[key][rows] = v.float() * weight
            elif key in UNIT_KEYS:
                self.acc[key][rows] = v.float()
            else:  # down_bias: the weighted sum of the experts' output biases
                self.acc[key].add_(v.float(), alpha=weight)
        self.pos += 1

    def result(self) -> dict[str, torch.Tensor]:
        if self.pos != self.k:
            raise RuntimeError(f"Concat got {self.pos} experts, expected {self.k}")
        return self.acc


def widen(units: dict[str, torch.Tensor], width: int, std: float, generator: torch.Generator | None = None):
    """Grow a merged expert to `width` hidden units without changing its output.

    New units get normal(0, std) gate/up rows (so they are not dead: they receive gradient) and
    zero down rows and biases (so they add nothing until trained).
    """
    inter = units["down"].shape[0]
    if width == inter:
        return units
    extra = width - inter
    out = {}
    for k, v in units.items():
        if k not in UNIT_KEYS:
            out[k] = v
            continue
        pad = torch.zeros(extra, *v.shape[1:])
        if k in ("gate", "up"):
            pad = torch.randn(pad.shape, generator=generator) * std
        out[k] = torch.cat([v, pad], dim=0)
    return out


def strongest_units(units: dict[str, torch.Tensor], count: int, activations: torch.Tensor | None = None) -> list[int]:
    """The `count` hidden units carrying the most output, ascending indices.

    With `activations` (I,), each unit's mean |activation| over sampled tokens: mean |a| × ‖down row‖,
    the average size of what the unit adds to the output. Without: its weights alone,
    ‖gate row‖·‖up row‖·‖down row‖.
    """
    if activations is not None:
        score = activations.float() * units["down"].norm(dim=1)
    else:
        score = units["up"].norm(dim=1) * units["down"].norm(dim=1)
        if "gate" in units:
            score = score * units["gate"].norm(dim=1)
    return sorted(torch.topk(score, count).indices.tolist())


def keep_units(units: dict[str, torch.Tensor], kept: list[int]) -> dict[str, torch.Tensor]:
    """Only the hidden units `kept` of a units view (the down bias is kept whole)."""
    index = torch.tensor(kept, dtype=torch.long)
    return {k: (v.index_select(0, index) if k in UNIT_KEYS else v) for k, v in units.items()}


def make_merger(kind: str, k: int):
    """The accumulator for a merge strategy kind (see `strategy.MERGES`)."""
    if kind in ("pca", "frequency"):
        return Average()
    if kind == "aligned":
        return AlignedAverage()
    if kind in ("concat", "feature", "pruned"):
        return Concat(k)
    raise ValueError(kind)


def silence_outputs(units: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same hidden units with the down rows and the down bias zero: they compute features, output nothing."""
    return {k: (torch.zeros_like(v) if k in ("down", "down_bias") else v) for k, v in units.items()}
