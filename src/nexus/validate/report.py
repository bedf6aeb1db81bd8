"""The validation report: `report.json` (DESIGN format), a readable `report.md` with verdicts, and plots.

Verdicts follow the seeds: perplexity degradation below 5 % is excellent retention, above 10 % fails;
in between is acceptable. Both thresholds are settable (`--excellent-threshold`, `--fail-threshold`).
A lower perplexity than the baseline (negative degradation) is an improvement, not a retention.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..fsutil import atomic_dir
from .metrics import Totals

FORMAT = "nexus-validation"
VERSION = 1
EXCELLENT_BELOW_PCT = 5.0  # seeds: "Perplexity degradation: <5% (excellent retention)"
FAIL_ABOVE_PCT = 10.0
IMPROVED, EXCELLENT, ACCEPTABLE, FAIL = "improved", "excellent retention", "acceptable", "fail"


def build_report(model: str, baseline: str, datasets: dict[str, Totals]) -> dict:
    """The report.json object. Layer figures are pooled over all datasets (token-weighted)."""
    pooled = Totals()
    for totals in datasets.values():
        pooled.merge(totals)
    return {"format": FORMAT, "version": VERSION, "model": model, "baseline": baseline,
            "datasets": {name: totals.summary() for name, totals in datasets.items()},
            "layers": pooled.layer_summary()}


def verdict(degradation: float | None, excellent_below: float = EXCELLENT_BELOW_PCT,
            fail_above: float = FAIL_ABOVE_PCT) -> str | None:
    """'improved' (< 0 %), 'excellent retention' (< excellent_below %), 'fail' (> fail_above %), else
    'acceptable'."""
    if degradation is None:
        return None
    if degradation < 0:
        return IMPROVED
    if degradation < excellent_below:
        return EXCELLENT
    if degradation > fail_above:
        return FAIL
    return ACCEPTABLE


def overall_verdict(report: dict, excellent_below: float = EXCELLENT_BELOW_PCT,
                    fail_above: float = FAIL_ABOVE_PCT) -> str | None:
    """The worst dataset verdict (None when perplexity was not computed)."""
    order = [IMPROVED, EXCELLENT, ACCEPTABLE, FAIL]
    verdicts = [verdict(d["degradation_pct"], excellent_below, fail_above) for d in report["datasets"].values()]
    verdicts = [v for v in verdicts if v is not None]
    return max(verdicts, key=order.index) if verdicts else None


def _f(x, fmt: str = ".4f", suffix: str = "") -> str:
    return "n/a" if x is None else f"{x:{fmt}}{suffix}"


def render_markdown(report: dict, excellent_below: float = EXCELLENT_BELOW_PCT,
                    fail_above: float = FAIL_ABOVE_PCT, baseline_note: str = "") -> str:
    overall = overall_verdict(report, excellent_below, fail_above)
    lines = ["# NEXUS validation report", "",
             f"- model: `{report['model']}`",
             f"- baseline: `{report['baseline']}`{(' — ' + baseline_note) if baseline_note else ''}", ""]
    lines += ["## Verdict", ""]
    if overall is None:
        lines.append("No verdict: perplexity was not computed (run with `--compute-perplexity`).")
    else:
        worst = max(report["datasets"].items(), key=lambda kv: kv[1]["degradation_pct"])
        what = "every dataset's perplexity is lower than the baseline's; smallest improvement" \
            if overall == IMPROVED else "largest perplexity degradation"
        lines.append(f"**{overall}** — {what} {worst[1]['degradation_pct']:+.2f} % "
                     f"(`{worst[0]}`). Thresholds: below 0 % improved, below {excellent_below:g} % excellent "
                     f"retention, above {fail_above:g} % fail.")
    lines += ["", "## Datasets", "",
              "| dataset | tokens | perplexity | baseline perplexity | change (+ = worse) | verdict | KL(baseline ‖ model) |",
              "|---|---:|---:|---:|---:|---|---:|"]
    for name, d in report["datasets"].items():
        v = verdict(d["degradation_pct"], excellent_below, fail_above) or "n/a"
        lines.append(f"| {name} | {d['tokens']:,} | {_f(d['perplexity'])} | {_f(d['baseline_perplexity'])} | "
                     f"{_f(d['degradation_pct'], '+.2f', ' %')} | {v} | {_f(d['kl'], '.3e')} |")
    lines += ["", "## MoE layers", "",
              "| layer | router entropy | baseline router entropy | routing agreement | shared / routed output |",
              "|---:|---:|---:|---:|---:|"]
    for layer, m in report["layers"].items():
        lines.append(f"| {layer} | {_f(m['router_entropy'])} | {_f(m['baseline_router_entropy'])} | "
                     f"{_f(m['routing_agreement'])} | {_f(m['shared_output_ratio'])} |")
    lines += ["", "## Definitions", "",
              "- Perplexity: exp(mean next-token NLL over non-padding targets), no auxiliary loss. "
              "Change (degradation_pct in report.json) = (perplexity / baseline perplexity − 1) × 100; negative "
              "is an improvement.",
              "- KL: mean over non-padding positions of KL(baseline ‖ model) of the next-token distributions "
              "(nats, temperature 1).",
              "- Router entropy: mean entropy (nats) of softmax(router logits) over all experts.",
              "- Routing agreement: |A ∩ B| / k of the routed top-k experts of model (A) and baseline (B), "
              "mean over tokens (1 = identical routing).",
              "- Shared / routed output: Σ‖shared expert output‖₂ / Σ‖original block output‖₂ over tokens.",
              "", "Plots: `plots/`.", ""]
    return "\n".join(lines)


def _layer_plot(path: Path, title: str, ylabel: str, series: list[tuple[str, list, list]]) -> None:
    from matplotlib.figure import Figure  # no pyplot: no global backend state, renders with Agg
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(7, 3.5))
    ax = fig.add_subplot()
    for label, xs, ys in series:
        ax.plot(xs, ys, marker="o", label=label)
    ax.set_xlabel("MoE layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def write_plots(report: dict, directory: Path) -> list[Path]:
    """Per-layer router entropy, routing agreement and shared/routed ratio; per-dataset perplexity bars."""
    from matplotlib.figure import Figure

    directory.mkdir(parents=True, exist_ok=True)
    layers = report["layers"]
    written = []

    def series(key):
        pts = [(int(k), v[key]) for k, v in layers.items() if v[key] is not None]
        return [p[0] for p in pts], [p[1] for p in pts]

    plots = [("router_entropy.png", "Router entropy per layer", "entropy (nats)",
              [("model", *series("router_entropy")), ("baseline", *series("baseline_router_entropy"))]),
             ("routing_agreement.png", "Routing agreement with the baseline (top-k overlap)", "|A ∩ B| / k",
              [("agreement", *series("routing_agreement"))]),
             ("shared_output_ratio.png", "Shared expert output relative to the routed output", "‖shared‖ / ‖routed‖",
              [("ratio", *series("shared_output_ratio"))])]
    for name, title, ylabel, data in plots:
        data = [s for s in data if s[1]]
        if data:
            _layer_plot(directory / name, title, ylabel, data)
            written.append(directory / name)

    names = [n for n, d in report["datasets"].items() if d["perplexity"] is not None]
    if names:
        fig = Figure(figsize=(max(4, 1.6 * len(names) + 2), 3.5))
        ax = fig.add_subplot()
        xs = range(len(names))
        width = 0.38
        ax.bar([x - width / 2 for x in xs], [report["datasets"][n]["baseline_perplexity"] for n in names],
               width, label="baseline")
        ax.bar([x + width / 2 for x in xs], [report["datasets"][n]["perplexity"] for n in names], width, label="model")
        for x, n in zip(xs, names):
            d = report["datasets"][n]
            ax.annotate(f"{d['degradation_pct']:+.2f} %", (x + width / 2, d["perplexity"]),
                        ha="center", va="bottom", fontsize=8)
        ax.set_xticks(list(xs), names)
        ax.set_ylabel("perplexity")
        ax.set_title("Perplexity per dataset (label: change vs baseline; − = better)")
        ax.set_ylim(0, 1.12 * max(max(d["perplexity"], d["baseline_perplexity"])
                                  for d in report["datasets"].values() if d["perplexity"] is not None))
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncols=2, frameon=False)
        fig.tight_layout()
        fig.savefig(directory / "perplexity.png", dpi=100)
        written.append(directory / "perplexity.png")
    return written


def write_report(report: dict, output: str | os.PathLike, excellent_below: float = EXCELLENT_BELOW_PCT,
                 fail_above: float = FAIL_ABOVE_PCT, overwrite: bool = False, baseline_note: str = "") -> Path:
    """Write report.json, report.md and plots/ into `output`, which appears only once complete."""
    output = Path(output)
    with atomic_dir(output, overwrite=overwrite) as tmp:
        with open(tmp / "report.json", "w") as f:
            json.dump(report, f, indent=2, allow_nan=False)
            f.write("\n")
        (tmp / "report.md").write_text(render_markdown(report, excellent_below, fail_above, baseline_note))
        write_plots(report, tmp / "plots")
    return output
