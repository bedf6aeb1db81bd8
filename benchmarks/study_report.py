"""The report of benchmarks/study.py from its results.jsonl only: per method a Pareto curve (domain gain %
against general loss change %, one point per learning rate, mean over seeds with min–max bars) as
pareto.png, and report.md with the best domain gain at a general loss increase under --max-general
percent per method and the study's questions answered from those points and at equal cost (each
method's domain gain at a general loss increase of 2 %, interpolated on each seed's Pareto front). Every figure comes from the
results file; nothing is typed in. A hand-written `preface.md` in --out (context: the model, what was
left out) goes under the title, as written.

    PYTHONPATH=src python benchmarks/study_report.py --results docs/study/results.jsonl --out docs/study \
        --doc docs/study.md
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from collections import Counter, defaultdict
from pathlib import Path

MAX_GENERAL = 5.0  # % general loss increase allowed for the headline figure
EQUAL_GENERAL = 2.0  # % general loss increase at which methods are compared at equal cost
PREFACE = "preface.md"  # in --out: hand-written text placed under the report's title, if present
TREND_WINDOW = 12  # evaluations over which the report measures how fast a run's validation loss fell at its end


def load(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def check_one_model(rows: list[dict], where: str) -> None:
    """Refuse rows made on different model weights or data (their `model_sha256` / `data_sha256`, written by
    study.py): their gains are measured against different base losses and cannot be paired. Rows written before
    study.py recorded the digests carry none and pass."""
    for key in ("model_sha256", "data_sha256"):
        seen: dict[str, int] = {}
        for r in rows:
            if r.get(key):
                seen[r[key]] = seen.get(r[key], 0) + 1
        if len(seen) > 1:
            counts = ", ".join(f"{h[:12]}… ({n} runs)" for h, n in seen.items())
            raise SystemExit(f"{where}: runs with different {key} ({counts}); a report pairs runs of one model on "
                             f"one data set: move the others to their own results file")


def machines(rows: list[dict]) -> str:
    """'; on CPU (kernels K)' for each CPU the runs trained on, by run count; empty for rows from before
    study.py recorded it."""
    seen = Counter(f"{r['cpu']} ({r.get('cpu_kernels')} kernels)" for r in rows if r.get("cpu"))
    if len(seen) == 1:
        return f"; on {next(iter(seen))}"
    return "; on " + ", ".join(f"{k}: {n} runs" for k, n in seen.items()) if seen else ""


def gains(row: dict, selected: bool = False) -> tuple[float, float]:
    """(domain gain %, general loss change %), both relative to the base model's loss on the same split:
    gain = 100 (base − after) / base on domain_eval, change = 100 (after − base) / base on general_eval; of
    the run's best-validation checkpoint, or with `selected` of the one chosen on general validation text."""
    s, e = row["start"], (row["selected"]["end"] if selected else row["end"])
    return (100.0 * (s["base_domain_loss"] - e["domain_loss"]) / s["base_domain_loss"],
            100.0 * (e["general_loss"] - s["base_general_loss"]) / s["base_general_loss"])


def trend_drop(losses, window: int) -> float | None:
    """How much the least-squares line through the last `window` losses (evenly spaced evaluations) falls
    from its first to its last evaluation; None with fewer than `window` losses. Positive: still improving."""
    if window < 2 or len(losses) < window:
        return None
    ys = [float(v) for v in losses[-window:]]
    xm, ym = (window - 1) / 2, statistics.fmean(ys)
    slope = sum((x - xm) * (y - ym) for x, y in enumerate(ys)) / sum((x - xm) ** 2 for x in range(window))
    return -slope * (window - 1)


def _stats(vals: list[float]) -> dict:
    return {"mean": statistics.mean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "min": min(vals), "max": max(vals), "n": len(vals)}


def _fall(rs: list[dict]) -> str:
    curves = [[v for _, v in r["val_curve"]] for r in rs if r.get("val_curve")]
    falls = [trend_drop(c, min(TREND_WINDOW, len(c))) for c in curves]
    falls = [f for f in falls if f is not None]
    return f"{statistics.mean(falls):.3f}" if falls else "–"


def points(rows: list[dict], selected: bool = False) -> dict[str, dict[float, dict]]:
    """{method: {lr: {domain, general (stats over seeds), per_seed {seed: (domain, general)}, rows}}}; with
    `selected`, of the checkpoints chosen on general validation text (runs with none are left out)."""
    by = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if not selected or r.get("selected"):
            by[r["method"]][float(r["lr"])].append(r)
    out = {}
    for m, lrs in by.items():
        out[m] = {}
        for lr, rs in sorted(lrs.items()):
            g = {int(r["seed"]): gains(r, selected) for r in rs}
            out[m][lr] = {"domain": _stats([v[0] for v in g.values()]), "general": _stats([v[1] for v in g.values()]),
                          "per_seed": g, "rows": rs}
    return out


def best_under(pts: dict[str, dict[float, dict]], max_general: float = MAX_GENERAL) -> dict[str, tuple[float, dict]]:
    """Per method the learning rate with the highest mean domain gain among those whose mean general loss
    change is below `max_general` %; methods with no such point are left out."""
    out = {}
    for m, lrs in pts.items():
        ok = [(lr, p) for lr, p in lrs.items() if p["general"]["mean"] < max_general]
        if ok:
            out[m] = max(ok, key=lambda t: t[1]["domain"]["mean"])
    return out


AXES = {"domain": 0, "general": 1}  # point stats key -> index in per_seed (domain gain %, general change %)


def separation(a: dict, b: dict, axis: str = "domain") -> dict:
    """Point a against point b on `axis` (domain gain or general change): paired (same seeds) mean difference,
    and whether the two methods' per-seed ranges (min–max over seeds) do not overlap ("exceeds the seed
    spread")."""
    i = AXES[axis]
    seeds = sorted(set(a["per_seed"]) & set(b["per_seed"]))
    diffs = [a["per_seed"][s][i] - b["per_seed"][s][i] for s in seeds]
    da, db = a[axis], b[axis]
    apart = da["min"] > db["max"] or db["min"] > da["max"]
    return {"paired_diff": statistics.mean(diffs) if diffs else None, "seeds": len(seeds),
            "exceeds_spread": apart and len(seeds) > 1}


def verdict(a: dict, b: dict, axis: str = "domain") -> str:
    """How point a compares with point b on `axis`: on domain gain ahead / behind, on general loss change
    costs less / more, beyond seed noise, or within it. With one shared seed, the difference on that seed
    alone (no noise estimate; head_to_head's overall says so once)."""
    sep = separation(a, b, axis)
    if sep["paired_diff"] is None:
        return "no shared seed"
    i = AXES[axis]
    seeds = sorted(set(a["per_seed"]) & set(b["per_seed"]))
    if len(seeds) == 1:
        return f"{sep['paired_diff']:+.2f} pt on seed {seeds[0]} alone"
    per_seed = ", ".join(f"{a['per_seed'][s][i] - b['per_seed'][s][i]:+.2f}" for s in seeds)
    better = sep["paired_diff"] > 0 if axis == "domain" else sep["paired_diff"] < 0
    if sep["exceeds_spread"]:
        word = ("ahead" if better else "behind") if axis == "domain" else ("costs less" if better else "costs more")
        word += ", beyond seed noise"
    else:
        word = "within seed noise (the seeds' min–max ranges overlap)"
    return f"{sep['paired_diff']:+.2f} pt paired over {len(seeds)} seeds ({per_seed}): {word}"


def head_to_head(pts: dict) -> list[dict]:
    """At each learning rate that a NEXUS setting and another method share, the NEXUS setting with the highest
    mean domain gain there against each other method, paired by seed on both axes, whatever the general
    cost: {lr, nexus, other, domain (verdict), general (verdict), overall}. overall says whether one point
    is better on both axes beyond seed noise (dominates)."""
    out = []
    for lr in sorted({lr for lrs in pts.values() for lr in lrs}):
        here = {m: lrs[lr] for m, lrs in pts.items() if lr in lrs}
        nexus = [m for m in here if m.startswith("nexus")]
        if not nexus:
            continue
        top = max(nexus, key=lambda m: here[m]["domain"]["mean"])
        for other in sorted(m for m in here if not m.startswith("nexus")):
            a, b = here[top], here[other]
            dom, gen = separation(a, b, "domain"), separation(a, b, "general")
            overall = "within seed noise on at least one axis"
            if dom["exceeds_spread"] and gen["exceeds_spread"]:
                if dom["paired_diff"] > 0 and gen["paired_diff"] < 0:
                    overall = f"{top} better on both, beyond seed noise"
                elif dom["paired_diff"] < 0 and gen["paired_diff"] > 0:
                    overall = f"{other} better on both, beyond seed noise"
                else:
                    overall = "a trade-off: each ahead on one axis, beyond seed noise"
            elif dom["seeds"] < 2:
                overall = "one seed, no estimate of seed noise"
            out.append({"lr": lr, "nexus": top, "other": other, "domain": verdict(a, b, "domain"),
                        "general": verdict(a, b, "general"), "overall": overall})
    return out


def front_at(points: list[tuple[float, float]], x: float) -> float:
    """Domain gain at general change `x` on the Pareto front of (general, domain) `points` plus the base
    model (0, 0): the front's points in order of general change, linearly interpolated between them; past
    the front's last point, its gain (a method that stays under `x` does not have to spend it)."""
    if x < 0:
        raise ValueError(f"general change {x} %: the comparison is at a non-negative cost")
    front = []
    for g, d in sorted([(0.0, 0.0)] + list(points)):
        if not front or d > front[-1][1]:
            front.append((g, d))
    for (g0, d0), (g1, d1) in zip(front, front[1:]):
        if g0 <= x <= g1:
            return d0 + (d1 - d0) * (x - g0) / (g1 - g0)
    return front[-1][1]


def equal_cost(pts: dict, x: float = EQUAL_GENERAL) -> dict[str, dict]:
    """Per method, each seed's domain gain at general change `x` (front_at over that seed's learning
    rates), as a point: {domain (stats over seeds), per_seed {seed: (gain, x)}}."""
    out = {}
    for m, lrs in pts.items():
        seeds = sorted({s for p in lrs.values() for s in p["per_seed"]})
        per_seed = {s: (front_at([(p["per_seed"][s][1], p["per_seed"][s][0]) for p in lrs.values()
                                  if s in p["per_seed"]], x), x) for s in seeds}
        out[m] = {"domain": _stats([v[0] for v in per_seed.values()]), "per_seed": per_seed}
    return out


def _pca_pairs(methods) -> list[tuple[str, str]]:
    """(nexus-pca_topK, reference) for each PCA-selected merge among `methods` and each of its references
    present: random init, and the same merge of the K most-routed experts (frequency_topK)."""
    return [(m, ref) for m in methods if m.startswith("nexus-pca_top")
            for ref in ("nexus-random", "nexus-frequency_top" + m.removeprefix("nexus-pca_top")) if ref in methods]


def answers(pts: dict, best: dict, max_general: float = MAX_GENERAL,
            equal_general: float = EQUAL_GENERAL) -> list[str]:
    """The study's questions answered from the best points under `max_general` and at equal cost
    (`equal_general`), one sentence each."""
    def point(m):
        lr, p = best[m]
        return f"**{m}** (lr {lr:g}: domain {_pm(p['domain'])} %, general {_pm(p['general'])} %)"

    nexus = sorted((m for m in best if m.startswith("nexus")), key=lambda m: best[m][1]["domain"]["mean"],
                   reverse=True)
    out = []
    if not nexus:
        return [f"No NEXUS setting kept the general loss increase under {max_general:g} %."] + [
            f"At lr {h['lr']:g}, whatever the general cost, {h['nexus']} against {h['other']}: domain gain "
            f"{h['domain']}; general loss change {h['general']}; {h['overall']}." for h in head_to_head(pts)]
    top = nexus[0]
    out.append(f"Best NEXUS setting: {point(top)}; then " + ", ".join(
        f"{m} {best[m][1]['domain']['mean']:+.2f}" for m in nexus[1:]) + " (best domain gain %, each at its own lr)."
        if len(nexus) > 1 else f"Best NEXUS setting: {point(top)}.")
    for other in ("esft", "esft-matched", "lora-attn-experts", "lora-attn", "full-moe"):
        if other in best:
            out.append(f"{top} against {point(other)}: {verdict(best[top][1], best[other][1])}.")
        elif other in pts:
            out.append(f"{other}: no learning rate kept the general loss increase under {max_general:g} %.")
    for pca, ref in _pca_pairs(best):
        out.append(f"PCA-selected merge {pca} against {ref}: {verdict(best[pca][1], best[ref][1])}.")
    eq = equal_cost(pts, equal_general)
    ranked = sorted(eq, key=lambda m: eq[m]["domain"]["mean"], reverse=True)
    chords = sorted(m for m in ranked if len(pts[m]) < 2)
    out.append(f"At equal cost, a general loss increase of {equal_general:g} % (each seed's Pareto front over its "
               f"learning rates and the base model, interpolated linearly): " + ", ".join(
                   f"{m} {_pm(eq[m]['domain'])}" for m in ranked) + " % domain gain" + (
                   f" ({', '.join(chords)}: one learning rate, so a chord from the base model to it, not a front)"
                   if chords else "") + ".")
    top_eq = next((m for m in ranked if m.startswith("nexus")), None)
    if top_eq:
        for other in (m for m in ranked if not m.startswith("nexus")):
            out.append(f"At equal cost, {top_eq} against {other}: {verdict(eq[top_eq], eq[other])}.")
        for pca, ref in _pca_pairs(eq):
            out.append(f"At equal cost, {pca} against {ref}: {verdict(eq[pca], eq[ref])}.")
    return out


def plot(pts: dict, path: Path, max_general: float = MAX_GENERAL) -> None:
    from matplotlib.figure import Figure  # no pyplot: no global backend state (Agg canvas via savefig)

    fig = Figure(figsize=(8, 6))
    ax = fig.add_subplot()
    for i, (m, lrs) in enumerate(sorted(pts.items())):
        xs = sorted(lrs.items(), key=lambda t: t[1]["general"]["mean"])
        x = [p["general"]["mean"] for _, p in xs]
        y = [p["domain"]["mean"] for _, p in xs]
        xerr = [[p["general"]["mean"] - p["general"]["min"] for _, p in xs],
                [p["general"]["max"] - p["general"]["mean"] for _, p in xs]]
        yerr = [[p["domain"]["mean"] - p["domain"]["min"] for _, p in xs],
                [p["domain"]["max"] - p["domain"]["mean"] for _, p in xs]]
        ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt="o", ms=4, capsize=2, label=m, color=f"C{i % 10}",
                    ls="-" if m.startswith("nexus") else "--")
        for (lr, _), xi, yi in zip(xs, x, y):
            ax.annotate(f"{lr:g}", (xi, yi), fontsize=6, xytext=(2, 2), textcoords="offset points")
    ax.axvline(max_general, color="k", lw=0.6, ls=":")
    ax.axvline(0, color="k", lw=0.4)
    ax.set_xlabel("general loss change (%), general_eval, vs base")
    ax.set_ylabel("domain loss gain (%), domain_eval, vs base")
    ax.set_title("one point per learning rate (labels); mean over seeds, bars min–max")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _h2h_table(h2h: list[dict]) -> list[str]:
    """head_to_head's rows as a markdown table."""
    return ["| lr | NEXUS setting | against | domain gain, paired difference | general loss change, paired "
            "difference | both axes |", "|---:|---|---|---|---|---|"] + [
        f"| {h['lr']:g} | {h['nexus']} | {h['other']} | {h['domain']} | {h['general']} | {h['overall']} |" for h in h2h]


def _pm(s: dict, d: int = 2) -> str:
    """mean ± std over seeds; one seed has no spread to give, so just its value."""
    return f"{s['mean']:+.{d}f}" + (f" ± {s['std']:.{d}f}" if s["n"] > 1 else "")


def _med(vals):
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else float("nan")


def markdown(rows: list[dict], pts: dict, best: dict, report_command: str | None, max_general: float = MAX_GENERAL) -> str:
    ranked = sorted(best, key=lambda m: best[m][1]["domain"]["mean"], reverse=True)
    first = rows[0]
    proto = first.get("protocol", {})
    tok = first.get("eval_tokens", {})
    lines = ["# Pareto study: NEXUS against other fine-tuning methods", "",
             "Written by `benchmarks/study_report.py` from `results.jsonl` (written by `benchmarks/study.py`; "
             "its docstring has the protocol).", "", "Commands that produced the results:", ""]
    lines += [f"    {c}" for c in dict.fromkeys(r["command"] for r in rows)]
    if report_command:
        lines += ["", "Report:", "", f"    {report_command}"]
    lines += ["", f"Model: `{first['model']}`. Held-out tokens scored per run (predicted tokens): domain_eval "
              f"{tok.get('domain', '?'):,}, general_eval {tok.get('general', '?'):,}; validation slice "
              f"{tok.get('val', '?'):,}." if tok else "", "",
              "Protocol: " + ", ".join(f"{k} {v}" for k, v in proto.items()) + f"; torch {first['torch']}, "
              f"{first['threads']} thread(s){machines(rows)}.", "",
              "Domain gain = 100 × (base − after) / base of the domain_eval loss (nats/token); general change = "
              "100 × (after − base) / base of the general_eval loss. FLOPs/token = 2 × active parameters (input "
              "embeddings excluded, routed experts at top_k / num_experts), NEXUS + 2 × its shared experts' "
              "parameters; merged LoRA, ESFT and full-moe add none.", "",
              "## Answers", "",
              f"From the best point of each method with a general loss increase under {max_general:g} % (mean "
              "over seeds ± std; paired differences in percentage points of domain gain, seed by seed; "
              "\"beyond seed noise\" = the two methods' per-seed min–max ranges do not overlap):", ""]
    lines += [f"- {a}" for a in answers(pts, best, max_general)]
    sel = points(rows, selected=True)
    for h in head_to_head(sel):
        limit = sel[h["nexus"]][h["lr"]]["rows"][0]["max_general"]
        lines.append(f"- On the checkpoints selected under {limit:g} % on general validation text (see \"Checkpoints "
                     f"selected\" below), at lr {h['lr']:g}, {h['nexus']} against {h['other']}: domain gain "
                     f"{h['domain']}; general loss change {h['general']}; {h['overall']}.")
    lines += ["", f"## Best domain gain with a general loss increase under {max_general:g} %", "",
              "| method | lr | domain gain % | general change % | seeds | vs best other (paired diff, beyond seed "
              "spread?) | trainable | FLOPs/token | steps (best) | step ms | peak RSS MiB |",
              "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
    for m in ranked:
        lr, p = best[m]
        other = next((o for o in ranked if o != m), None)
        if other:
            sep = separation(p, best[other][1])
            vs = (f"{other}: {sep['paired_diff']:+.2f} pt, {'yes' if sep['exceeds_spread'] else 'no'}"
                  if sep["paired_diff"] is not None else f"{other}: no shared seed")
        else:
            vs = "–"
        rs = p["rows"]
        lines.append(f"| {m} | {lr:g} | {_pm(p['domain'])} | {_pm(p['general'])} | {p['domain']['n']} | {vs} | "
                     f"{rs[0]['trainable']:,} | {rs[0]['flops_per_token']:,} | "
                     f"{_med([r['steps'] for r in rs]):.0f} ({_med([r['best_step'] for r in rs]):.0f}) | "
                     f"{_med([r['step_s'] for r in rs]) * 1e3:.0f} | {_med([r['rss_mib'] for r in rs]):.0f} |")
    missing = sorted(set(pts) - set(best))
    if missing:
        lines += ["", f"No learning rate kept the general loss increase under {max_general:g} % for: "
                  + ", ".join(missing) + "."]
    lines += ["", "![Pareto curves](pareto.png)", ""]
    h2h = head_to_head(pts)
    if h2h:
        lines += ["## Head to head at each learning rate", "",
                  "At each learning rate, the NEXUS setting with the highest mean domain gain there against every "
                  "other method, seed by seed on both axes and whatever the general cost (a method's points at "
                  "other learning rates are above).", "",
                  *_h2h_table(h2h)]
        lines.append("")
    lines += ["## Every point (mean over seeds)", "",
              "| method | lr | domain gain % | general change % | seeds | domain loss base → after | "
              f"general loss base → after | steps (best) | stopped | validation fall, last {TREND_WINDOW} evals |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for m in sorted(pts):
        for lr, p in pts[m].items():
            rs = p["rows"]
            mean = lambda key, when="end": statistics.mean(r[when][key] for r in rs)  # noqa: E731
            lines.append(f"| {m} | {lr:g} | {_pm(p['domain'])} | {_pm(p['general'])} | {p['domain']['n']} | "
                         f"{mean('base_domain_loss', 'start'):.4f} → {mean('domain_loss'):.4f} | "
                         f"{mean('base_general_loss', 'start'):.4f} → {mean('general_loss'):.4f} | "
                         f"{_med([r['steps'] for r in rs]):.0f} ({_med([r['best_step'] for r in rs]):.0f}) | "
                         f"{', '.join(sorted(set(r['stopped'] for r in rs)))} | {_fall(rs)} |")
    notes = [f"Validation fall: how much the least-squares line through a run's last {TREND_WINDOW} validation losses "
             "falls across them, or through all of them if fewer (nats, mean over seeds, on the stopping rule's "
             "validation slice). A run that has plateaued shows about 0; a few hundredths mean it was still improving "
             "when it stopped, whatever rule stopped it."]
    if any(r.get("memory_split") for r in rows):
        notes.append("ESFT rows train their chosen experts split out as their own tensors (deltas on the frozen "
                     "fused expert tensors): gradients and AdamW state cover those experts only; each forward "
                     "still composes the full expert tensor.")
    if any(r.get("memory_split") is False for r in rows):
        notes.append("ESFT rows train their experts in place under a gradient mask: the trainable count is "
                     "real, but the optimizer and gradient memory cover the whole expert tensors (not split out "
                     "as in ESFT), so their peak RSS overstates ESFT's.")
    notes.append("Peak RSS is each run's own process (`ru_maxrss`), including the frozen base copy used as "
                 "evaluation reference and teacher; compare rows, not absolute values. Step times depend on the "
                 "machine's load.")
    lines += ["", "Notes:", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


def selected_check(rows: list[dict]) -> str:
    """A markdown section for the runs that measured general validation text (study.py --general-val): per
    (method, lr) the checkpoint with the lowest domain validation loss under the general limit there, scored
    like the best-validation one, and the NEXUS settings against the other methods on those checkpoints."""
    runs = [r for r in rows if "selected" in r]
    if not runs:
        return ""
    limits = sorted({r["max_general"] for r in runs})
    limit = "/".join(f"{x:g}" for x in limits)
    pts = points(runs, selected=True)
    lines = [f"## Checkpoints selected on general validation text (under {limit} %)", "",
             "Runs made with `--general-val` also measured, at every validation evaluation, the loss on general text "
             "that neither pretraining nor the scoring saw (the testbed's `general_val`), and scored a second "
             f"checkpoint: the one with the lowest domain validation loss among those whose general loss there was "
             f"under {limit} % above the base's — what a user who must keep general text within the limit would "
             "keep. The sections above use each run's best-validation checkpoint. Domain gain and general change "
             "are on the full held-out splits, as above, so a selected checkpoint can land over the limit there.", "",
             "| method | lr | seeds | selected step / steps (median) | general_val change % at it | domain gain % | "
             "general change % | under the limit on general_eval |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    by = defaultdict(list)
    for r in runs:
        by[(r["method"], float(r["lr"]))].append(r)
    for (m, lr), rs in sorted(by.items()):
        sel = [r for r in rs if r["selected"]]
        if not sel:
            lines.append(f"| {m} | {lr:g} | {len(rs)} | none qualified | – | – | – | – |")
            continue
        p = pts[m][lr]
        under = sum(1 for s in p["per_seed"].values() if s[1] < rs[0]["max_general"])
        lines.append(f"| {m} | {lr:g} | {len(sel)}{f' of {len(rs)}' if len(sel) < len(rs) else ''} | "
                     f"{_med([r['selected']['step'] for r in sel]):.0f} / {_med([r['steps'] for r in sel]):.0f} | "
                     f"{statistics.mean(r['selected']['general_val_change'] for r in sel):+.2f} | {_pm(p['domain'])} | "
                     f"{_pm(p['general'])} | {under} of {len(sel)} |")
    h2h = head_to_head(pts)
    if h2h:
        lines += ["", "The selected checkpoints head to head (as above: at each learning rate the NEXUS setting with the "
                  "highest mean domain gain there against every other method, seed by seed on both axes):", "",
                  *_h2h_table(h2h)]
    return "\n".join(lines) + "\n"


def budget_check(rows: list[dict], longer: list[dict]) -> str:
    """A markdown section setting runs of a longer --max-steps beside the same (method, lr, seed) runs of the
    main results: did the budget cap the main runs, and does the ranking change with more steps?"""
    main = {(r["method"], float(r["lr"]), int(r["seed"])): r for r in rows}
    pairs = [(main.get((r["method"], float(r["lr"]), int(r["seed"]))), r) for r in longer]
    pairs = sorted(((a, b) for a, b in pairs if a is not None), key=lambda p: (p[1]["method"], p[1]["lr"]))
    if not pairs:
        return ""
    caps = sorted({str(b.get("protocol", {}).get("max_steps", "?")) for _, b in pairs})
    base = sorted({str(a.get("protocol", {}).get("max_steps", "?")) for a, _ in pairs})
    lines = [f"## A longer budget: --max-steps {', '.join(caps)} against {', '.join(base)}", "",
             "The same runs (method, lr, seed) with only --max-steps raised (warmup stays 10 % of it, so it is "
             "longer too), from the second results file; domain gain % / general change % at the best "
             "validation step, as above.", "",
             *[f"    {c}" for c in dict.fromkeys(r["command"] for r in longer)], "",
             f"| method | lr | seed | at --max-steps {', '.join(base)}: domain / general | steps (best), stopped | "
             f"at --max-steps {', '.join(caps)}: domain / general | steps (best), stopped |",
             "|---|---:|---:|---:|---|---:|---|"]
    for a, b in pairs:
        (da, ga), (db, gb) = gains(a), gains(b)
        lines.append(f"| {b['method']} | {float(b['lr']):g} | {b['seed']} | {da:+.2f} / {ga:+.2f} | {a['steps']} "
                     f"({a['best_step']}), {a['stopped']} | {db:+.2f} / {gb:+.2f} | {b['steps']} ({b['best_step']}), "
                     f"{b['stopped']} |")
    return "\n".join(lines) + "\n"


def beside_check(rows: list[dict], other: list[dict]) -> str:
    """A markdown section setting the runs of a second results file beside the same (method, lr, seed) runs of the
    main results, naming the protocol settings in which they differ: what changing them does, seed by seed, and
    the paired mean difference per (method, lr)."""
    main = {(r["method"], float(r["lr"]), int(r["seed"])): r for r in rows}
    pairs = [(main.get((r["method"], float(r["lr"]), int(r["seed"]))), r) for r in other]
    pairs = sorted(((a, b) for a, b in pairs if a is not None), key=lambda p: (p[1]["method"], p[1]["lr"], p[1]["seed"]))
    if not pairs:
        return ""
    proto = [(a.get("protocol", {}), b.get("protocol", {})) for a, b in pairs]
    keys = sorted({k for pa, pb in proto for k in set(pa) | set(pb) if pa.get(k) != pb.get(k)})

    def setting(p: dict) -> str:  # a setting a run did not use (None, absent) is named as left out, not as "None"
        used = [f"{k} {p[k]}" for k in keys if p.get(k) is not None]
        unused = [k for k in keys if p.get(k) is None]
        return ", ".join(used + ([f"without {' / '.join(unused)}"] if unused else [])) or "the same protocol"

    left, right = ("; ".join(sorted({setting(p[i]) for p in proto})) for i in (0, 1))
    lines = [f"## Beside: {right} against {left}", "",
             "The same runs (method, lr, seed) from a second results file, made by:", "",
             *[f"    {c}" for c in dict.fromkeys(r["command"] for _, r in pairs)], "",
             f"| method | lr | seed | {left}: domain / general | {right}: domain / general | difference |",
             "|---|---:|---:|---:|---:|---:|"]
    diffs: dict[tuple[str, float], list[tuple[float, float]]] = {}
    for a, b in pairs:
        (da, ga), (db, gb) = gains(a), gains(b)
        diffs.setdefault((b["method"], float(b["lr"])), []).append((db - da, gb - ga))
        lines.append(f"| {b['method']} | {float(b['lr']):g} | {b['seed']} | {da:+.2f} / {ga:+.2f} | "
                     f"{db:+.2f} / {gb:+.2f} | {db - da:+.2f} / {gb - ga:+.2f} |")
    lines += ["", f"Paired mean difference ({right} minus {left}), domain gain / general change, in points:", ""]
    for (method, lr), d in diffs.items():
        dom, gen = [x for x, _ in d], [y for _, y in d]
        if all(x == 0 and y == 0 for x, y in d):
            sign = "identical on every seed" if len(d) > 1 else "identical"
        elif len(d) == 1:
            sign = "one seed"
        else:
            sign = "every seed the same sign" if all(x > 0 for x in dom) or all(x < 0 for x in dom) \
                else "seeds disagree in sign"
        mean_dom, mean_gen = (round(statistics.mean(v), 2) + 0.0 for v in (dom, gen))  # + 0.0: no "-0.00"
        lines.append(f"- {method} at lr {lr:g}: {mean_dom:+.2f} / {mean_gen:+.2f} over "
                     f"{len(d)} seed{'s' if len(d) > 1 else ''} (domain: {sign})")
    return "\n".join(lines) + "\n"


def write_report(results: Path, out: Path, doc: Path | None = None, report_command: str | None = None,
                 max_general: float = MAX_GENERAL, longer: Path | None = None, beside: Path | None = None) -> str:
    rows = load(results) if results.is_file() else []
    if not rows:
        return f"{results}: no results yet"
    longer_rows, beside_rows = (load(f) if f is not None and f.is_file() else None for f in (longer, beside))
    check_one_model(rows + (longer_rows or []) + (beside_rows or []),
                    ", ".join(str(f) for f, r in ((results, rows), (longer, longer_rows), (beside, beside_rows)) if r))
    pts = points(rows)
    best = best_under(pts, max_general)
    out.mkdir(parents=True, exist_ok=True)
    plot(pts, out / "pareto.png", max_general)
    text = markdown(rows, pts, best, report_command, max_general)
    extra = selected_check(rows)
    if extra:
        text = text.replace("\n## Every point (mean over seeds)", f"\n{extra}\n## Every point (mean over seeds)", 1)
    if longer_rows is not None:
        extra = budget_check(rows, longer_rows)
        if extra:
            text = text.replace("\n## Every point (mean over seeds)", f"\n{extra}\n## Every point (mean over seeds)", 1)
    if beside_rows is not None:
        extra = beside_check(rows, beside_rows)
        if extra:
            text = text.replace("\n## Every point (mean over seeds)", f"\n{extra}\n## Every point (mean over seeds)", 1)
    preface = out / PREFACE
    if preface.is_file():  # hand-written context (what the study ran on, what it left out), kept on every rewrite
        title, rest = text.split("\n", 1)
        text = f"{title}\n\n{preface.read_text().strip()}\n{rest}"
    (out / "report.md").write_text(text)
    if doc is not None:
        png, where = (out / "pareto.png").resolve(), doc.resolve().parent
        rel = png.relative_to(where) if png.is_relative_to(where) else png
        doc.write_text(text.replace("](pareto.png)", f"]({rel})"))
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default="docs/study/results.jsonl")
    p.add_argument("--out", default="docs/study", help="pareto.png and report.md go here (default docs/study)")
    p.add_argument("--doc", help="also write the markdown here (e.g. docs/study.md)")
    p.add_argument("--max-general", type=float, default=MAX_GENERAL)
    p.add_argument("--longer", help="results.jsonl of the same runs at a larger --max-steps (a budget check section)")
    p.add_argument("--beside", help="results.jsonl of the same runs under another setting (e.g. --hidden-tokens 0): "
                                    "a section setting them side by side, seed by seed")
    a = p.parse_args()
    cmd = "python benchmarks/study_report.py " + " ".join(shlex.quote(x) for x in sys.argv[1:])
    print(write_report(Path(a.results), Path(a.out), Path(a.doc) if a.doc else None, cmd, a.max_general,
                       Path(a.longer) if a.longer else None, Path(a.beside) if a.beside else None))


if __name__ == "__main__":
    main()
