"""Tables, plots and docs/study.md of benchmarks/study.py, from docs/study/results_qN.json only."""

from __future__ import annotations

import json
from pathlib import Path

TITLES = {1: "Init strategies", 2: "NEXUS against other fine-tuning methods", 3: "Sensitivity"}


def _pm(v, digits=2):
    return f"{v[0]:.{digits}f} ± {v[1]:.{digits}f}"


def _pct(new, old):
    return 100.0 * (new - old) / old


def table(q: int, res: dict) -> str:
    """The markdown table of question q."""
    if q == 1:
        lines = ["| init | trainable | KL domain @0 | domain ppl @0 | general ppl @0 | KL domain @end | "
                 "domain ppl @end | general ppl @end |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for name, r in res.items():
            s = r["summary"]
            lines.append(f"| {name} | {int(s['trainable']):,} | {_pm(s['start_domain_kl'], 4)} | "
                         f"{_pm(s['start_domain_ppl'])} | {_pm(s['start_general_ppl'])} | {_pm(s['end_domain_kl'], 4)} | "
                         f"{_pm(s['end_domain_ppl'])} | {_pm(s['end_general_ppl'])} |")
    elif q == 2:
        lines = ["| method | trainable | domain ppl @0 → @end | domain gained | general ppl @end | general lost | "
                 "median step (ms) | peak RSS (MiB) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]  # step, RSS: medians
        for name, r in res.items():
            s = r["summary"]
            base_d, base_g = s["start_base_domain_ppl"][0], s["start_base_general_ppl"][0]
            label = name + (f" (r={r['rank']})" if "rank" in r else "")
            lines.append(f"| {label} | {int(s['trainable']):,} | {s['start_domain_ppl'][0]:.2f} → "
                         f"{_pm(s['end_domain_ppl'])} | {-_pct(s['end_domain_ppl'][0], base_d):+.2f} % | "
                         f"{_pm(s['end_general_ppl'])} | {_pct(s['end_general_ppl'][0], base_g):+.2f} % | "
                         f"{s['step_s'] * 1e3:.0f} | {s['rss_mib']:.0f} |")
    else:
        lines = ["| knob | value | trainable | domain ppl @0 | domain ppl @end | general ppl @end | KL domain @end |",
                 "|---|---:|---:|---:|---:|---:|---:|"]
        for r in res.values():
            s = r["summary"]
            lines.append(f"| {r['knob']} | {r['value']} | {int(s['trainable']):,} | {s['start_domain_ppl'][0]:.2f} | "
                         f"{s['end_domain_ppl'][0]:.2f} | {s['end_general_ppl'][0]:.2f} | {s['end_domain_kl'][0]:.4f} |")
    return "\n".join(lines)


def plot(q: int, res: dict, path: Path) -> None:
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    if q == 1:
        names = list(res)
        fig = Figure(figsize=(15, 4.5))
        axes = fig.subplots(1, 3)
        for ax, key, label in zip(axes, ("domain_ppl", "general_ppl", "domain_kl"),
                                  ("domain perplexity", "general perplexity", "KL(base ‖ model), domain")):
            x = range(len(names))
            for off, when in ((-0.2, "start"), (0.2, "end")):
                vals = [res[n]["summary"][f"{when}_{key}"] for n in names]
                ax.bar([i + off for i in x], [v[0] for v in vals], 0.4, yerr=[v[1] for v in vals],
                       label="step 0" if when == "start" else "after budget", capsize=3)
            if key != "domain_kl":
                base = res[names[0]]["summary"][f"start_base_{key}"][0]
                ax.axhline(base, color="k", lw=0.8, ls="--", label="base model")
                lo = min(min(res[n]["summary"][f"{w}_{key}"][0] for n in names) for w in ("start", "end"))
                hi = max(max(res[n]["summary"][f"{w}_{key}"][0] for n in names) for w in ("start", "end"))
                ax.set_ylim(lo - 0.15 * (hi - lo) - 0.1, hi + 0.15 * (hi - lo) + 0.1)
            ax.set_xticks(list(x), names, rotation=45, ha="right")
            ax.set_title(label)
        axes[0].legend()
    elif q == 2:
        fig = Figure(figsize=(7, 5))
        ax = fig.add_subplot()
        for name, r in res.items():
            s = r["summary"]
            gain = -_pct(s["end_domain_ppl"][0], s["start_base_domain_ppl"][0])
            loss = _pct(s["end_general_ppl"][0], s["start_base_general_ppl"][0])
            ax.scatter(loss, gain, s=30 + s["trainable"] / 2000)
            ax.annotate(f"{name}\n{int(s['trainable']):,} params", (loss, gain), fontsize=8)
        ax.axvline(0, color="k", lw=0.5)
        ax.set_xlabel("general perplexity lost (%)")
        ax.set_ylabel("domain perplexity gained (%)")
        ax.set_title("domain gained vs general lost (marker size ∝ trainable params)")
    else:
        knobs = []
        for r in res.values():
            if r["knob"] not in knobs:
                knobs.append(r["knob"])
        fig = Figure(figsize=(5 * len(knobs), 4))
        axes = fig.subplots(1, len(knobs), squeeze=False)[0]
        for ax, knob in zip(axes, knobs):
            pts = [r for r in res.values() if r["knob"] == knob]
            xs = [r["value"] for r in pts]
            ax.plot(xs, [r["summary"]["end_domain_ppl"][0] for r in pts], "o-", color="C0", label="domain ppl")
            ax.axhline(pts[0]["summary"]["start_base_domain_ppl"][0], color="C0", ls="--", lw=0.8, label="base domain")
            ax.set_ylabel("domain perplexity", color="C0")
            gx = ax.twinx()  # general perplexity moves far less: its own axis
            gx.plot(xs, [r["summary"]["end_general_ppl"][0] for r in pts], "s-", color="C1", label="general ppl")
            gx.axhline(pts[0]["summary"]["start_base_general_ppl"][0], color="C1", ls="--", lw=0.8,
                       label="base general")
            gx.set_ylabel("general perplexity", color="C1")
            ax.set_xticks(xs)
            ax.set_xlabel(knob)
            ax.set_title(f"after the budget, vs {knob}")
            if knob == knobs[0]:
                h1, l1 = ax.get_legend_handles_labels()
                h2, l2 = gx.get_legend_handles_labels()
                ax.legend(h1 + h2, l1 + l2, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _setup_text(meta: dict) -> str:
    a = meta["args"]
    return (f"Run: `--questions {meta['question']} --steps {a['steps']} --seeds {' '.join(map(str, a['seeds']))}`; "
            f"{a['steps']} steps × {a['batch']} sequences × {a['seq_len']} tokens of domain_train; evaluation on "
            f"{a['eval_num']} packed sequences of {a['seq_len']} tokens per split; {len(a['seeds'])} seed(s); "
            f"torch {meta['torch']}, {meta['threads']} thread; {meta['seconds'] / 60:.1f} min.")


def findings(q: int, res: dict) -> list[str]:
    """Sentences computed from the results (the ranking, who beats whom): no hand-typed figures."""
    out = []
    if q == 1:
        end = {n: r["summary"]["end_domain_ppl"] for n, r in res.items()}
        order = sorted(end, key=lambda n: end[n][0])
        out.append("Ranked by domain perplexity after the budget (lower is better): " +
                   ", ".join(f"{n} {end[n][0]:.2f}" for n in order) + ".")
        start_kl = {n: r["summary"]["start_domain_kl"][0] for n, r in res.items()}
        out.append("Ranked by KL to the teacher at step 0 (how much the init disturbs the model): " +
                   ", ".join(f"{n} {start_kl[n]:.4f}" for n in sorted(start_kl, key=start_kl.get)) + ".")
        low = min(r["summary"]["trainable"] for r in res.values())
        same = [n for n in order if res[n]["summary"]["trainable"] == low]
        if len(same) < len(order):
            out.append(f"At the same parameter count ({int(low):,}, width 1×) only: " +
                       ", ".join(f"{n} {_pm(end[n])}" for n in same) + ".")
        best, second = order[0], order[1]
        gap = end[second][0] - end[best][0]
        noise = max(end[best][1], end[second][1])
        out.append(f"The gap between the best two ({best}, {second}) is {gap:.2f} against a seed std of up to "
                   f"{noise:.2f}: {'within' if gap <= 2 * noise else 'outside'} two standard deviations.")
    elif q == 2:
        gain = {n: -_pct(r["summary"]["end_domain_ppl"][0], r["summary"]["start_base_domain_ppl"][0])
                for n, r in res.items()}
        loss = {n: _pct(r["summary"]["end_general_ppl"][0], r["summary"]["start_base_general_ppl"][0])
                for n, r in res.items()}
        out.append("Most domain perplexity gained: " + ", ".join(
            f"{n} {gain[n]:+.2f} %" for n in sorted(gain, key=gain.get, reverse=True)) + ".")
        out.append("Least general perplexity lost: " + ", ".join(
            f"{n} {loss[n]:+.2f} %" for n in sorted(loss, key=loss.get)) + ".")
    else:
        for knob in dict.fromkeys(r["knob"] for r in res.values()):
            pts = [r for r in res.values() if r["knob"] == knob]
            best = min(pts, key=lambda r: r["summary"]["end_domain_ppl"][0])
            out.append(f"{knob}: best domain perplexity at {best['value']} "
                       f"({best['summary']['end_domain_ppl'][0]:.2f}); general perplexity over the sweep "
                       f"{min(r['summary']['end_general_ppl'][0] for r in pts):.2f}–"
                       f"{max(r['summary']['end_general_ppl'][0] for r in pts):.2f}.")
    return out


def write_report(docs: Path, out: Path) -> Path:
    """docs/study.md and docs/study/qN.png from every results_qN.json present."""
    from study_notes import DISCUSSION, INTRO, NOTES

    lines = ["# Method study on the demo MoE", "", INTRO, ""]
    for q in (1, 2, 3):
        f = docs / f"results_q{q}.json"
        if not f.is_file():
            lines += [f"## {q}. {TITLES[q]}", "", "Not run yet.", ""]
            continue
        data = json.loads(f.read_text())
        res = data["results"]
        plot(q, res, docs / f"q{q}.png")
        first = next(iter(res.values()))["summary"]
        lines += [f"## {q}. {TITLES[q]}", "", _setup_text(data["meta"]), "",
                  f"Base model on the same evaluation: domain perplexity {first['start_base_domain_ppl'][0]:.2f}, "
                  f"general perplexity {first['start_base_general_ppl'][0]:.2f}.", "", NOTES[q], "",
                  table(q, res), "", f"![question {q}](study/q{q}.png)", ""]
        lines += [f"- {s}" for s in findings(q, res)] + [""]
        if q == 1:  # measured when the report is written: one backward through a zero-initialized model
            import study_lib

            grads = study_lib.zero_init_grads()
            lines += ["Zero init, max |gradient| over layers after one LM backward (measured by "
                      "`study_lib.zero_init_grads`): " + ", ".join(f"`{k}` {v:.3g}" for k, v in grads.items()) + ".", ""]
    lines += ["## Discussion", "", DISCUSSION, ""]
    out.write_text("\n".join(lines))
    return out
