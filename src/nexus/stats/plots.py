"""Plots and a markdown summary of `nexus analyze` (matplotlib `Figure`s, no pyplot; any expert count).

Input is the pca_stats.json dictionary. Files written into a directory:
explained_variance.png, importance_heatmap.png, importance_rank.png, selected_experts.png, summary.md.
Each `plot_*` function returns its open figure when given no path.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .pca import HEADLINE_K

DPI = 120
LEGEND_MAX_LAYERS = 12  # up to this many layers get a legend; more get a discrete colour bar


def _figure(**kwargs):
    """A figure of its own (no pyplot: no global figure state, no backend switch)."""
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def _cmap(name: str):
    import matplotlib

    return matplotlib.colormaps[name]


def _layers(result: dict) -> list[str]:
    return sorted(result["layers"], key=int)


def _grid_size(num_layers: int, num_experts: int) -> tuple[float, float]:
    """Figure size for a layers x experts image: wide enough to tell experts apart, capped."""
    width = min(22.0, max(7.0, 3.0 + num_experts * 0.12))
    height = min(16.0, max(3.5, 1.8 + num_layers * 0.28))
    return width, height


NICE_STEPS = (1, 2, 4, 5, 8, 10, 16, 20, 25, 32, 50, 64, 100, 128, 200, 256, 500, 1000)
TICK_FONT = 8  # points
LABEL_GAP_IN = 0.12  # blank space between two tick labels, inches


def _ticks(n: int, most: int = 32) -> np.ndarray:
    """At most `most` tick positions over 0..n-1, at a round step."""
    step = next((s for s in NICE_STEPS if np.ceil(n / s) <= most), int(np.ceil(n / most)))
    return np.arange(0, n, step)


def _labels_fitting(n: int, axis_inches: float) -> int:
    """How many tick labels of up to len(str(n - 1)) digits fit side by side along `axis_inches`."""
    digit_in = 0.6 * TICK_FONT / 72  # a digit is about 0.6 em wide
    return max(2, int(axis_inches / (len(str(max(n - 1, 0))) * digit_in + LABEL_GAP_IN)))


def _expert_ticks(ax, fig, n: int) -> None:
    """Expert-index ticks on the x axis, as many as fit without overlapping."""
    fig.canvas.draw()  # layout done: the axes' real width is known
    width = ax.get_window_extent().width / fig.dpi
    ticks = _ticks(n, _labels_fitting(n, width))
    ax.set_xticks(ticks, [str(t) for t in ticks], fontsize=TICK_FONT)


def _finish(fig, path: Path | None):
    """Save to `path`; with no path, return the figure (for tests and notebooks)."""
    if path is None:
        return fig
    fig.savefig(path, dpi=DPI)
    return None


def plot_explained_variance(result: dict, path: Path | None = None):
    layers = _layers(result)
    fig = _figure(figsize=(7.5, 4.8))
    ax = fig.subplots()
    cmap = _cmap("viridis")
    for j, layer in enumerate(layers):
        ratios = np.asarray(result["layers"][layer]["explained_variance_ratio"])
        x = np.arange(1, len(ratios) + 1)
        ax.plot(x, np.cumsum(ratios), color=cmap(j / max(1, len(layers) - 1)), lw=1.2, alpha=0.85,
                label=f"layer {layer}")
    ax.axhline(0.9, color="gray", ls=":", lw=1)
    ax.text(1, 0.905, "90 %", color="gray", fontsize=8, va="bottom")
    ax.set(xlabel="principal components", ylabel="cumulative explained variance",
           title="Router probabilities: cumulative explained variance per MoE layer", ylim=(0, 1.02))
    ax.set_xlim(1, result["num_experts"])
    if len(layers) <= LEGEND_MAX_LAYERS:  # a few discrete layers: one legend entry each
        ax.legend(fontsize=8, loc="lower right", ncols=2 if len(layers) > 6 else 1)
    else:  # many: a colour bar with one band per layer position
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import BoundaryNorm

        norm = BoundaryNorm(np.arange(len(layers) + 1) - 0.5, cmap.N)
        sm = ScalarMappable(cmap=cmap, norm=norm)
        bar = fig.colorbar(sm, ax=ax, label="MoE layer")
        shown = _ticks(len(layers), 16)
        bar.set_ticks(shown, labels=[layers[i] for i in shown])
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _finish(fig, path)


def plot_importance_heatmap(result: dict, path: Path | None = None):
    layers = _layers(result)
    num = result["num_experts"]
    grid = np.array([result["layers"][layer]["importance"] for layer in layers])  # (L, E)
    fig = _figure(figsize=_grid_size(len(layers), num))
    ax = fig.subplots()
    im = ax.imshow(grid, aspect="auto", cmap="magma", interpolation="nearest")
    rows, cols = zip(*[(j, e) for j, layer in enumerate(layers) for e in result["layers"][layer]["selected_experts"]])
    marker = max(4.0, min(40.0, 3000.0 / (num * max(len(layers), 1)) ** 0.9))
    ax.scatter(cols, rows, s=marker, facecolors="none", edgecolors="cyan", linewidths=0.9, label="selected")
    ax.set_yticks(_ticks(len(layers)), [layers[i] for i in _ticks(len(layers))])
    ax.set(xlabel="expert", ylabel="layer",
           title=f"Expert importance ({result['selection']['importance']}; share of each layer), selected circled")
    ax.legend(loc="upper right", fontsize=8, framealpha=0.8)
    fig.colorbar(im, ax=ax, label="share of layer importance")
    fig.tight_layout()
    _expert_ticks(ax, fig, num)
    return _finish(fig, path)


def plot_importance_rank(result: dict, path: Path | None = None):
    layers = _layers(result)
    num = result["num_experts"]
    ranked = np.array([np.sort(result["layers"][layer]["importance"])[::-1] for layer in layers])  # (L, E)
    x = np.arange(1, num + 1)
    fig = _figure(figsize=(8, 4.8))
    ax = fig.subplots()
    for row in ranked:
        ax.plot(x, row, color="steelblue", lw=0.8, alpha=0.35)
    ax.plot(x, ranked.mean(0), color="navy", lw=2, label="share per rank (mean over layers)")
    ax.axhline(1 / num, color="gray", ls=":", lw=1, label=f"uniform (1/{num})")
    ax.set(xlabel="expert rank", ylabel="share of importance", xlim=(1, num),
           title="Expert importance by rank, with cumulative share")
    ax2 = ax.twinx()
    cumulative = np.cumsum(ranked, axis=1).mean(0)
    ax2.plot(x, cumulative, color="darkorange", lw=2, label="cumulative share (mean)")
    for k in HEADLINE_K:
        if k <= num:
            ax2.plot([k], [cumulative[k - 1]], "o", color="darkorange")
            ax2.annotate(f"top-{k}: {cumulative[k - 1]:.0%}", (k, cumulative[k - 1]), textcoords="offset points",
                         xytext=(6, -12), fontsize=9, color="darkorange")
    ax2.set(ylabel="cumulative share", ylim=(0, 1.02))
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="center right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _finish(fig, path)


def plot_selected(result: dict, path: Path | None = None):
    layers = _layers(result)
    num = result["num_experts"]
    grid = np.full((len(layers), num), np.nan)  # (L, E) merge weight where selected
    for j, layer in enumerate(layers):
        entry = result["layers"][layer]
        grid[j, entry["selected_experts"]] = entry["weights"]
    width, height = _grid_size(len(layers), num)
    fig = _figure(figsize=(width + 2, height))
    ax, axk = fig.subplots(1, 2, sharey=True, gridspec_kw={"width_ratios": [max(4, width - 1.5), 1.5]})
    im = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap="viridis", interpolation="nearest",
                   vmin=0.0, vmax=float(np.nanmax(grid)))
    ax.set_facecolor("#f2f2f2")
    ax.set_yticks(_ticks(len(layers)), [layers[i] for i in _ticks(len(layers))])
    ax.set(xlabel="expert", ylabel="layer", title="Selected experts per layer (colour = merge weight)")
    fig.colorbar(im, ax=ax, label="merge weight")
    ks = [result["layers"][layer]["k"] for layer in layers]
    axk.barh(np.arange(len(layers)), ks, color="slategray")
    axk.set(xlabel="k selected", title="k")
    axk.set_xlim(0, max(ks) * 1.25)
    fig.tight_layout()
    _expert_ticks(ax, fig, num)
    return _finish(fig, path)


def summary_markdown(result: dict) -> str:
    s, sel = result["summary"], result["selection"]
    lines = [
        "# Router statistics: PCA and expert selection", "",
        f"- model type `{result['model_type']}`, {result['num_experts']} experts per layer, routed top-"
        f"{result['routing_top_k']}, {len(result['layers'])} MoE layers, {result['tokens']:,} tokens",
        f"- importance `{sel['importance']}`, top-k `{sel['top_k']}`, merge weights `{sel['merge_weights']}`",
        f"- **top-4 share {s['top4_share']:.1%}, top-24 share {s['top24_share']:.1%}** (mean over layers): "
        f"category **{s['category']}**, recommended k {s['recommended_top_k']} "
        f"(range {s['recommended_range'][0]}–{s['recommended_range'][1]})",
        "- layers by category: " + ", ".join(f"{k} {v}" for k, v in s["layers_by_category"].items()),
    ]
    lines += [f"- note: {n}" for n in s["notes"]]
    lines += ["", "| layer | category | top-4 share | top-24 share | k | selected experts (most important first) |",
              "|---:|---|---:|---:|---:|---|"]
    for layer in _layers(result):
        e = result["layers"][layer]
        lines.append(f"| {layer} | {e['category']} | {e['top4_share']:.1%} | {e['top24_share']:.1%} | {e['k']} | "
                     f"{', '.join(map(str, e['selected_experts']))} |")
    lines += ["", "Plots: `explained_variance.png`, `importance_heatmap.png`, `importance_rank.png`, "
              "`selected_experts.png`.", ""]
    return "\n".join(lines)


def write_all(result: dict, directory: Path) -> list[Path]:
    """Write every plot and summary.md into `directory`; returns the paths written."""
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for name, fn in (("explained_variance.png", plot_explained_variance),
                     ("importance_heatmap.png", plot_importance_heatmap),
                     ("importance_rank.png", plot_importance_rank),
                     ("selected_experts.png", plot_selected)):
        fn(result, directory / name)
        out.append(directory / name)
    (directory / "summary.md").write_text(summary_markdown(result))
    out.append(directory / "summary.md")
    return out
