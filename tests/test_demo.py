"""A shortened `nexus demo` end to end on the bundled model: every artifact produced and well-formed."""

from __future__ import annotations

import json
import math

import pytest
from safetensors.torch import load_file

from nexus.cli import main


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--quick", "--output", str(out)])
    assert exit_info.value.code == 0
    return out


def test_every_stage_artifact_is_written(demo_out):
    for rel in ("data/general_train.jsonl", "data/domain_train.jsonl", "sample.jsonl", "router_stats.safetensors",
                "pca_stats.json", "plots/summary.md", "adapter/nexus_config.json", "adapter/nexus_adapter.safetensors",
                "train/metrics.jsonl", "train/final/nexus_adapter.safetensors", "train/plots/metrics.png",
                "validation/report.json", "validation/report.md", "REPORT.md"):
        assert (demo_out / rel).is_file(), rel
    assert len(list((demo_out / "plots").glob("*.png"))) >= 4


def test_artifacts_are_well_formed(demo_out):
    pca = json.loads((demo_out / "pca_stats.json").read_text())
    assert pca["format"] == "nexus-pca-stats" and pca["num_experts"] == 32
    for layer in pca["layers"].values():
        assert len(layer["selected_experts"]) == 8 and abs(sum(layer["weights"]) - 1) < 1e-6
    adapter = json.loads((demo_out / "adapter" / "nexus_config.json").read_text())
    assert adapter["format"] == "nexus-adapter" and adapter["model_type"] == "gpt_oss"
    assert adapter["init_strategy"] == "random"  # configs/demo.yaml follows docs/study.md
    rows = [json.loads(line) for line in (demo_out / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows][-1] == 4 and all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in rows)
    report = json.loads((demo_out / "validation" / "report.json").read_text())
    assert set(report["datasets"]) == {"general", "domain"}
    for d in report["datasets"].values():
        assert d["tokens"] > 0 and d["perplexity"] > 1 and d["baseline_perplexity"] > 1
    assert len(report["layers"]) == 4
    weights = load_file(str(demo_out / "train" / "final" / "nexus_adapter.safetensors"))
    assert len(weights) == 4 * 4  # 4 layers x (gate_up, gate_up bias, down, down bias)
    text = (demo_out / "REPORT.md").read_text()
    for section in ("## Router analysis", "## Initialization", "## Training", "## Validation", "## Summary"):
        assert section in text
    for link in [line.split("](")[1].rstrip(")") for line in text.splitlines() if line.startswith("![")]:
        assert (demo_out / link).is_file(), link


def test_rerun_skips_finished_stages(demo_out, capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--quick", "--output", str(demo_out)])
    assert capsys.readouterr().out.count("complete, skipping") == 6


def test_training_plot_is_the_one_plot_metrics_draws_with_the_planned_schedule(demo_out, tmp_path):
    from nexus.train.plots import metrics_figure, plot_run, read_metrics

    train = demo_out / "train"
    again, steps = plot_run(train, tmp_path / "metrics.png", title="demo training")
    assert steps == 4 and again.read_bytes() == (train / "plots" / "metrics.png").read_bytes()
    fig = metrics_figure(read_metrics(train / "metrics.jsonl"), json.loads((train / "run_config.json").read_text()))
    labels = [t.get_text() for t in fig.axes[1].get_legend().get_texts()]
    assert "planned lr" in labels and "planned temperature (right)" in labels


def test_report_states_the_python_version_and_corpus_it_measured(demo_out):
    import platform

    line = next(x for x in (demo_out / "REPORT.md").read_text().splitlines() if x.startswith("Corpus: "))
    assert f"CPython {platform.python_version()}" in line
    rows = len((demo_out / "data" / "domain_eval.jsonl").read_text().splitlines())
    assert f"domain_eval {rows} files / " in line


def test_the_report_describes_every_init_strategy():
    from nexus.convert.strategy import MERGES
    from nexus.demo.report import init_description

    for name in ["zero", "random", *(f"{kind}_top4" for kind in MERGES), "tensors"]:
        assert init_description(name)
    assert "random weights" in init_description("random") and "average" in init_description("pca_top8")
