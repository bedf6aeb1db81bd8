"""The demo: its pipeline config (`demo_config`) and REPORT.md composed from the stages' outputs
(`write_report`). `nexus demo` (`nexus.demo.cli`) runs them on the bundled model."""

from __future__ import annotations

import json
import platform
from pathlib import Path

from .. import demo_data
from ..config import CONFIG_NAME, NexusConfig
from ..errors import NexusError
from ..fsutil import atomic_path, read_json
from ..pipeline.runner import Context, load_pipeline_config
from ..validate.report import verdict

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


QUICK = {"sample": {"target_tokens": 4000, "max_candidates": 200},
         "collect": {"target_tokens": 4000},
         "train": {"max_steps": 4, "checkpoint_interval": 2},
         "validate": {"num_samples": 6}}


def demo_config(max_steps: int | None = None, quick: bool = False, config_path: Path = CONFIG) -> dict:
    """The demo pipeline config; `quick` shrinks every stage to a smoke run, `max_steps` sets training steps."""
    cfg = load_pipeline_config(config_path)
    if quick:
        for stage, opts in QUICK.items():
            cfg["stages"][stage].update(opts)
    if max_steps is not None:
        if max_steps < 1:
            raise NexusError(f"--max-steps must be >= 1, got {max_steps}")
        train = cfg["stages"]["train"]
        train["max_steps"] = max_steps
        train["checkpoint_interval"] = max(1, min(train.get("checkpoint_interval", max_steps), max_steps))
    return cfg


def _fmt(x, digits=2):
    return "n/a" if x is None else f"{x:.{digits}f}"


def corpus_line(data_dir: Path) -> str:
    """What the demo measured on: this interpreter's version and the files / bytes of each split used."""
    parts = []
    for split in demo_data.SPLITS:
        path = data_dir / f"{split}.jsonl"
        if path.is_file():
            texts = [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line]
            parts.append(f"{split} {len(texts)} files / {sum(len(t.encode()) for t in texts) / 1000:,.1f} kB")
    return (f"Corpus: the standard library of CPython {platform.python_version()}, the interpreter that ran the "
            f"demo (another version reads other files; docs/pipeline.md lists the splits per version): "
            + ", ".join(parts) + ".")


_INITS = {
    "zero": "every shared expert starts at zero (the model's outputs are unchanged at step 0)",
    "random": "every shared expert starts from random weights (normal, the config's initializer_range) and zero "
              "biases; the router analysis above is for reference: no init built from these experts did better in "
              "docs/study.md",
    "pca": "each layer's shared expert is the weighted average of the experts selected above",
    "frequency": "each layer's shared expert is the weighted average of the experts selected above",
    "aligned": "each layer's shared expert is the weighted average of the experts selected above, their hidden "
               "units aligned first",
    "concat": "each layer's shared expert is the experts selected above side by side, weighted",
    "feature": "each layer's shared expert has the hidden units of the experts selected above with a zero down "
               "projection (outputs unchanged at step 0)",
    "pruned": "each layer's shared expert keeps the strongest hidden units of the experts selected above, weighted",
}


def init_description(init_strategy: str) -> str:
    """What an adapter's `init_strategy` put in the shared experts, in words (the demo report's sentence)."""
    from ..convert.strategy import parse_strategy

    try:
        kind = parse_strategy(init_strategy).kind
    except NexusError:  # "tensors" (Python API) or another writer's name
        return f"shared experts initialized by `{init_strategy}`"
    return _INITS[kind]


def write_report(ctx: Context, seconds: dict[str, float]) -> tuple[Path, str]:
    """Compose REPORT.md from the stages' own outputs; returns its path and a two-line summary."""
    work = Path(ctx.work_dir)
    pca = read_json(ctx.out("analyze"), "pca_stats.json")
    adapter_cfg = NexusConfig.from_json_file(Path(ctx.out("convert")) / CONFIG_NAME)
    report = read_json(Path(ctx.out("validate")) / "report.json", "validation report")
    train_dir = Path(ctx.out("train"))
    rows = [json.loads(line) for line in (train_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rel = lambda p: Path(p).resolve().relative_to(work.resolve()).as_posix()  # noqa: E731

    lines = ["# NEXUS demo report", "",
             f"Model: bundled demo MoE (`{ctx.model}`), {pca['num_experts']} experts per layer, "
             f"routed top-{pca.get('routing_top_k', '?')}. Config: `{CONFIG.name}`. "
             f"Stage times: " + ", ".join(f"{k} {v:.0f}s" for k, v in seconds.items()) + ".", "",
             corpus_line(work / "data"), ""]

    summary = pca.get("summary", {})
    lines += ["## Router analysis", "",
              f"Tokens analyzed: {pca.get('tokens', 'n/a')}. Top-4 share of expert importance: "
              f"{_fmt(summary.get('top4_share'), 3)}; category **{summary.get('category', 'n/a')}** "
              f"(recommended k {summary.get('recommended_top_k', 'n/a')}).", "",
              "| layer | top-4 share | category | selected experts | weights |", "|---|---|---|---|---|"]
    for layer, info in sorted(pca["layers"].items(), key=lambda kv: int(kv[0])):
        lines.append(f"| {layer} | {_fmt(info.get('top4_share'), 3)} | {info.get('category', '')} | "
                     f"{info['selected_experts']} | {[round(w, 3) for w in info['weights']]} |")
    plots = Path(ctx.out("analyze")).parent / "plots"
    for png in sorted(plots.glob("*.png")) if plots.is_dir() else []:
        lines += ["", f"![{png.stem}]({rel(png)})"]

    lines += ["", "## Initialization", "",
              f"Strategy `{adapter_cfg.init_strategy}`, width x{adapter_cfg.width_multiplier}, "
              f"scale {adapter_cfg.scale}: {init_description(adapter_cfg.init_strategy)}."]

    n = max(1, min(10, len(rows) // 2))  # single steps are noisy: compare the means of the first and last n
    mean = lambda key, part: sum(r[key] for r in part) / len(part)  # noqa: E731
    first, last = rows[:n], rows[-n:]
    lines += ["", "## Training", "",
              f"{rows[-1]['step']} steps on the held-out domain (distillation from the bundled model + LM loss). "
              f"Mean of the first / last {n} steps: loss {mean('loss', first):.3f} -> {mean('loss', last):.3f}, "
              f"CE {mean('ce', first):.3f} -> {mean('ce', last):.3f}, KL {mean('kl', first):.4f} -> "
              f"{mean('kl', last):.4f}.", ""]
    metrics_png = train_dir / "plots" / "metrics.png"
    if metrics_png.is_file():
        lines.append(f"![training curves]({rel(metrics_png)})")

    ds = report["datasets"]
    lines += ["", "## Validation", "",
              "| data | tokens | base perplexity | NEXUS perplexity | change | KL(base ‖ NEXUS) |",
              "|---|---|---|---|---|---|"]
    for name, d in ds.items():
        lines.append(f"| {name} | {d['tokens']} | {_fmt(d['baseline_perplexity'])} | {_fmt(d['perplexity'])} | "
                     f"{_fmt(d['degradation_pct'])} % | {_fmt(d['kl'], 4)} |")
    lines += ["", "| layer | shared/routed output norm | routing agreement | router entropy (base -> NEXUS) |",
              "|---|---|---|---|"]
    for layer, d in sorted(report["layers"].items(), key=lambda kv: int(kv[0])):
        lines.append(f"| {layer} | {_fmt(d['shared_output_ratio'], 3)} | {_fmt(d['routing_agreement'], 3)} | "
                     f"{_fmt(d['baseline_router_entropy'], 3)} -> {_fmt(d['router_entropy'], 3)} |")
    vplots = Path(ctx.out("validate")) / "plots"
    for png in sorted(vplots.glob("*.png")) if vplots.is_dir() else []:
        lines += ["", f"![{png.stem}]({rel(png)})"]

    dom, gen = ds.get("domain"), ds.get("general")
    summary_lines = []
    if dom and gen:
        summary_lines = [
            f"domain perplexity {dom['baseline_perplexity']:.2f} -> {dom['perplexity']:.2f} "
            f"({dom['degradation_pct']:+.1f} %)",
            f"general perplexity {gen['baseline_perplexity']:.2f} -> {gen['perplexity']:.2f} "
            f"({gen['degradation_pct']:+.1f} %, {verdict(gen['degradation_pct'])})",
        ]
        lines += ["", "## Summary", ""] + [f"- {s}" for s in summary_lines]
    path = work / "REPORT.md"
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return path, "\n".join(summary_lines)
