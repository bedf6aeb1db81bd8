"""Init strategies and the per-layer expert selection they use (from `pca_stats.json`).

    zero              all zeros: the converted model computes exactly what the base computes
    random            normal(0, initializer_range) weights, zero biases
    pca_topK          weighted average of the first K experts `pca_stats.json` selects per layer
    frequency_topK    the same merge; the name records that `analyze` ranked experts by routing frequency
    aligned_topK      the same average after permuting each expert's hidden units to match the first one's
    concat_topK       the K experts side by side (K × I wide): computes exactly Σ wₖ Eₖ(x)
    feature_topK      function-preserving: the K experts' hidden units (gate/up rows and biases) with the
                      down projection and its bias zero, so the model's outputs are unchanged at step 0;
                      at --width-multiplier M (default 1) the M × I units of the K × I that carry the most
                      weighted output, more than K × I adding random gate/up rows. "Most output": mean
                      |activation| × ‖wₖ down row‖ over collect's sampled hidden states (--hidden-sample),
                      else the weights alone (‖gate‖·‖up‖·‖wₖ down‖)
    pruned_topK       concat_topK at any width: the same M × I strongest units of the K × I, down rows
                      scaled by their expert's weight (the best single-width approximation of concat_topK
                      this ranking gives; at M = K it is concat_topK exactly)

Weights are the file's `weights` for the first K `selected_experts`, renormalized to sum to 1.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import NexusError
from ..fsutil import is_safetensors, read_json

PCA_FORMAT = "nexus-pca-stats"
PCA_VERSION = 1
MERGES = ("pca", "frequency", "aligned", "concat", "feature", "pruned")
_TOPK = re.compile(r"^(pca|frequency|aligned|concat|feature|pruned)_top(\d+)$")
WEIGHT_SUM_TOLERANCE = 1e-3  # hand-written files round their weights
# `nexus convert`'s default: the study (docs/study.md) found no expert-based init that beats it on a testbed
# whose experts specialize, and it needs no router statistics.
DEFAULT_INIT = "random"


@dataclass(frozen=True)
class Strategy:
    kind: str  # "zero", "random", or one of MERGES
    top_k: int | None = None

    @property
    def name(self) -> str:
        return self.kind if self.top_k is None else f"{self.kind}_top{self.top_k}"

    @property
    def reads_experts(self) -> bool:
        return self.kind in MERGES

    @property
    def merged_width(self) -> int:
        """The merged expert's width in routed-expert widths: K side by side (concat, feature, pruned), else 1."""
        return self.top_k if self.kind in ("concat", "feature", "pruned") else 1


def ranks_units(strategy: Strategy, width_multiplier: float) -> bool:
    """Whether convert keeps only some of the merged experts' hidden units, and so ranks them: feature_topK and
    pruned_topK (K × I units) below width K, the averaging merges (I units) below width 1."""
    if not strategy.reads_experts or strategy.kind == "concat":
        return False
    return width_multiplier < strategy.merged_width


def parse_strategy(text: str) -> Strategy:
    """`zero`, `random`, or `{pca,frequency,aligned,concat,feature,pruned}_topK`; errors name the flag."""
    if text in ("zero", "random"):
        return Strategy(text)
    m = _TOPK.match(text or "")
    if m is None or int(m.group(2)) < 1:
        raise NexusError(f"--init-strategy {text!r}: unknown init strategy (expected zero, random, or "
                         f"pca_topK / frequency_topK / aligned_topK / concat_topK / feature_topK / pruned_topK "
                         f"with K >= 1, e.g. pca_top24)")
    return Strategy(m.group(1), int(m.group(2)))


@dataclass
class LayerSelection:
    experts: list[int]  # expert indices, most important first
    weights: list[float]  # sum to 1


def load_selection(path: str | Path, strategy: Strategy, moe_layers: list[int],
                   num_experts: int) -> tuple[dict[int, LayerSelection], dict]:
    """Read `pca_stats.json` and take each layer's first K experts with renormalized weights.

    Checks the file against the model (expert count, MoE layers) and itself (indices in range,
    no repeats, weights non-negative and summing to 1). Returns ({layer: selection}, the file).
    """
    path = Path(path)
    flag = "--pca-stats"
    if is_safetensors(path):
        raise NexusError(f"{flag} {path}: a safetensors file (router statistics from `nexus collect`?), not a "
                         f"pca_stats.json; make one with: nexus analyze --input {path} --output pca_stats.json")
    stats = read_json(path, "pca_stats.json (router statistics from `nexus analyze`)")
    if not isinstance(stats, dict) or stats.get("format") != PCA_FORMAT:
        raise NexusError(f"{flag} {path}: not a pca_stats.json (format != '{PCA_FORMAT}')")
    if int(stats.get("version", 0)) > PCA_VERSION:
        raise NexusError(f"{flag} {path}: version {stats['version']} is newer than this NEXUS reads ({PCA_VERSION})")
    if stats.get("num_experts") != num_experts:
        raise NexusError(f"{flag} {path}: made for {stats.get('num_experts')} experts per layer, the model has "
                         f"{num_experts}")
    layers = stats.get("layers")
    if not isinstance(layers, dict):
        raise NexusError(f"{flag} {path}: no 'layers' object")
    try:
        file_layers = sorted(int(k) for k in layers)
    except ValueError:
        raise NexusError(f"{flag} {path}: layer keys must be decoder-layer indices, got {sorted(layers)}") from None
    if file_layers != sorted(moe_layers):
        raise NexusError(f"{flag} {path}: has layers {file_layers}, the model's MoE layers are {sorted(moe_layers)}")
    k = strategy.top_k
    out = {}
    for layer in moe_layers:
        entry = layers[str(layer)]
        where = f"{flag} {path}: layer {layer}"
        experts, weights = entry.get("selected_experts"), entry.get("weights")
        if not isinstance(experts, list) or not isinstance(weights, list) or len(experts) != len(weights):
            raise NexusError(f"{where}: needs 'selected_experts' and 'weights' lists of the same length")
        if not all(isinstance(e, int) and not isinstance(e, bool) and 0 <= e < num_experts for e in experts):
            raise NexusError(f"{where}: selected_experts must be expert indices in [0, {num_experts}), got {experts}")
        if len(set(experts)) != len(experts):
            raise NexusError(f"{where}: selected_experts repeats an expert: {experts}")
        if not all(isinstance(w, (int, float)) and math.isfinite(w) and w >= 0 for w in weights):
            raise NexusError(f"{where}: weights must be finite and non-negative, got {weights}")
        if abs(sum(weights) - 1.0) > WEIGHT_SUM_TOLERANCE:
            raise NexusError(f"{where}: weights sum to {sum(weights):.6g}, expected 1")
        if k > len(experts):
            raise NexusError(f"--init-strategy {strategy.name}: asks for {k} experts, but {flag} {path} selects "
                             f"only {len(experts)} in layer {layer}")
        top_w = [float(w) for w in weights[:k]]
        total = sum(top_w)
        if total <= 0:
            raise NexusError(f"{where}: the first {k} selected experts all have weight 0")
        out[layer] = LayerSelection(experts=[int(e) for e in experts[:k]], weights=[w / total for w in top_w])
    return out, stats
