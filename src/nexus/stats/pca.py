"""PCA of router probabilities, expert importance and expert selection (pure numpy, no I/O).

Everything comes from the streaming sums of `accumulate.RouterStats`; per MoE layer:

- covariance of the router probabilities, cov = prob_outer / count - mean mean^T (E, E), its
  eigen-decomposition and explained-variance ratios (descending);
- expert importance, normalized to shares that sum to 1:
    pca        sum_i |loading_{i,e}| x explained_variance_ratio_i over the top n components, where
               loading_{i,e} is expert e's entry of unit eigenvector i (the original tool's score);
    frequency  share of routed top-k slots the expert received (topk_count / sum);
    gate       mean routing weight the expert received per token (gate_sum / count);
- the top-4 share of importance, which sets the layer's category (the seeds' thresholds):
    > 0.70 steep_cliff (k = 4), > 0.50 moderate (k 4-8), > 0.35 gradual (k 8-16), else even (k 24+);
- the selected experts: the k most important (ties to the lower index), with merge weights that
  sum to 1 (`equal` or proportional to `importance`). `auto` k is the smallest k whose cumulative
  share reaches `auto_share`, clamped into the layer category's recommended range. Every k is
  capped at the number of experts.
"""

from __future__ import annotations

import math

import numpy as np

IMPORTANCE = ("pca", "frequency", "gate")
MERGE_WEIGHTS = ("equal", "importance")
HEADLINE_K = (4, 24)  # the seeds report the top-4 and top-24 share of importance
# (name, top-4 share must exceed, recommended k range; None = "or more")
CATEGORIES = (
    ("steep_cliff", 0.70, (4, 4)),
    ("moderate", 0.50, (4, 8)),
    ("gradual", 0.35, (8, 16)),
    ("even", -math.inf, (24, None)),
)


def moments(prob_sum: np.ndarray, prob_outer: np.ndarray, count: float) -> tuple[np.ndarray, np.ndarray]:
    """Mean (E,) and covariance (E, E) of the router probabilities."""
    if count <= 0:
        raise ValueError("no tokens counted")
    mean = prob_sum / count
    cov = prob_outer / count - np.outer(mean, mean)
    return mean, (cov + cov.T) / 2


def principal_components(cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Explained-variance ratios (E,) descending and unit components (E, E), row i = component i.

    Tiny negative eigenvalues (rounding; the probabilities sum to 1, so one direction has none)
    are clipped to 0. A layer without variance gets all-zero ratios.
    """
    values, vectors = np.linalg.eigh(cov)  # ascending
    values = np.clip(values[::-1], 0.0, None)
    components = vectors[:, ::-1].T
    total = values.sum()
    ratios = values / total if total > 0 else np.zeros_like(values)
    return ratios, components


def normalize(scores: np.ndarray) -> np.ndarray:
    """Shares summing to 1 (uniform when every score is 0)."""
    scores = np.clip(np.asarray(scores, dtype=np.float64), 0.0, None)
    total = scores.sum()
    return scores / total if total > 0 else np.full(len(scores), 1.0 / len(scores))


def importance_pca(ratios: np.ndarray, components: np.ndarray, n_components: int) -> np.ndarray:
    """sum_i |components[i, e]| x ratios[i] over the first n components. (E,) shares."""
    n = min(n_components, len(ratios))
    return normalize(np.abs(components[:n]).T @ ratios[:n])


def importance_frequency(topk_count: np.ndarray) -> np.ndarray:
    return normalize(topk_count)


def importance_gate(gate_sum: np.ndarray, count: float) -> np.ndarray:
    return normalize(gate_sum / max(count, 1.0))


def ranking(share: np.ndarray) -> np.ndarray:
    """Expert indices by decreasing importance; equal importance goes to the lower index."""
    return np.lexsort((np.arange(len(share)), -share))


def top_share(share: np.ndarray, k: int) -> float:
    """Share of importance held by the k most important experts (k capped at E)."""
    return float(np.sort(share)[::-1][: min(k, len(share))].sum())


def category(top4_share: float) -> tuple[str, tuple[int, int | None]]:
    """The seeds' category of a top-4 share, and its recommended k range."""
    for name, above, k_range in CATEGORIES:
        if top4_share > above:
            return name, k_range
    raise AssertionError("unreachable")


def recommended_k(k_range: tuple[int, int | None], num_experts: int) -> int:
    """One k for a category: the top of its range (24 for `even`), capped at the expert count."""
    low, high = k_range
    return min(high if high is not None else low, num_experts)


def auto_k(share: np.ndarray, auto_share: float = 0.5) -> int:
    """Smallest k whose cumulative share reaches `auto_share`, clamped into the category's range."""
    num = len(share)
    cumulative = np.cumsum(np.sort(share)[::-1])
    k = int(np.searchsorted(cumulative, auto_share - 1e-12) + 1)
    low, high = category(top_share(share, 4))[1]
    k = max(k, low)
    if high is not None:
        k = min(k, high)
    return max(1, min(k, num))


def merge_weights(share: np.ndarray, selected: np.ndarray, mode: str) -> np.ndarray:
    """Weights of the selected experts, summing to 1."""
    if mode == "equal":
        return np.full(len(selected), 1.0 / len(selected))
    if mode == "importance":
        return normalize(share[selected])
    raise ValueError(f"unknown merge weights {mode!r} (expected one of {MERGE_WEIGHTS})")


def analyze_layer(sums: dict[str, np.ndarray], top_k: int | str, importance: str, n_components: int,
                  weights_mode: str, auto_share: float, routing_top_k: int) -> dict:
    """The pca_stats.json entry of one layer from its sums (numpy float64 arrays by field name)."""
    count = float(sums["count"][0])
    mean, cov = moments(sums["prob_sum"], sums["prob_outer"], count)
    ratios, components = principal_components(cov)
    if importance == "pca":
        share = importance_pca(ratios, components, n_components)
    elif importance == "frequency":
        share = importance_frequency(sums["topk_count"])
    elif importance == "gate":
        share = importance_gate(sums["gate_sum"], count)
    else:
        raise ValueError(f"unknown importance {importance!r} (expected one of {IMPORTANCE})")
    num = len(share)
    k = auto_k(share, auto_share) if top_k == "auto" else min(int(top_k), num)
    selected = ranking(share)[:k]
    top4 = top_share(share, HEADLINE_K[0])
    name, k_range = category(top4)
    routed = sums["topk_count"] / max(count * max(routing_top_k, 1), 1.0)
    return {
        "explained_variance_ratio": ratios.tolist(),
        "importance": share.tolist(),
        "selected_experts": [int(e) for e in selected],
        "weights": merge_weights(share, selected, weights_mode).tolist(),
        "top4_share": top4,
        "top24_share": top_share(share, HEADLINE_K[1]),
        "category": name,
        "recommended_top_k": recommended_k(k_range, num),
        "k": int(k),
        "mean_probability": mean.tolist(),
        "routed_share": routed.tolist(),
        "mean_entropy": float(sums["entropy_sum"][0] / count),
    }


def summarize(layers: dict[str, dict], num_experts: int) -> dict:
    """Model-level headline figures: mean top-4 / top-24 share over layers, their category and k."""
    top4 = float(np.mean([entry["top4_share"] for entry in layers.values()]))
    top24 = float(np.mean([entry["top24_share"] for entry in layers.values()]))
    name, k_range = category(top4)
    counts = {c[0]: sum(entry["category"] == c[0] for entry in layers.values()) for c in CATEGORIES}
    notes = []
    if num_experts < HEADLINE_K[1]:
        notes.append(f"the model has {num_experts} experts per layer (< {HEADLINE_K[1]}): the top-{HEADLINE_K[1]} "
                     f"share is 1 and every k is capped at {num_experts}")
    if k_range[1] is None and num_experts < k_range[0]:
        notes.append(f"category '{name}' recommends k >= {k_range[0]}; capped at {num_experts}")
    return {"top4_share": top4, "top24_share": top24, "category": name,
            "recommended_top_k": recommended_k(k_range, num_experts),
            "recommended_range": [min(k_range[0], num_experts),
                                  min(k_range[1], num_experts) if k_range[1] is not None else num_experts],
            "layers_by_category": counts, "notes": notes}
