"""`nexus analyze`: PCA recovers known spectra, categories follow the seeds, k is sensible, files are right."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config
from tiny import random_text, run_cli, run_main, save_model_dir, subprocess_env, write_jsonl

from nexus.stats import pca
from nexus.stats.accumulate import RouterStats


def stats_with_covariance(cov: np.ndarray, mean: np.ndarray, count: int = 1000, layers=(0,), top_k: int = 2,
                          topk_count=None, gate_sum=None) -> RouterStats:
    """Statistics whose sums give exactly this mean and covariance."""
    e = len(mean)
    stats = RouterStats(list(layers), e, top_k, "gpt_oss", "constructed")
    for layer in layers:
        s = stats.sums[layer]
        s["count"][0] = count
        s["prob_sum"][:] = torch.from_numpy(count * mean)
        s["prob_outer"][:] = torch.from_numpy(count * (cov + np.outer(mean, mean)))
        s["topk_count"][:] = torch.from_numpy(np.asarray(topk_count if topk_count is not None else np.ones(e)))
        s["gate_sum"][:] = torch.from_numpy(np.asarray(gate_sum if gate_sum is not None else np.ones(e)))
        s["entropy_sum"][0] = count * 1.5
    return stats


def layer_of(stats: RouterStats, layer: int = 0) -> dict:
    return {f: t.numpy() for f, t in stats.sums[layer].items()}


def test_known_spectrum_recovers_ranking():
    # Four orthonormal directions, each shared by two experts: (e_a - e_b) / sqrt(2), variances 4:3:2:1.
    pairs, variances = [(5, 2), (7, 0), (1, 6), (3, 4)], np.array([4.0, 3.0, 2.0, 1.0]) * 1e-3
    cov = np.zeros((8, 8))
    for (a, b), var in zip(pairs, variances):
        u = np.zeros(8)
        u[a], u[b] = 2 ** -0.5, -(2 ** -0.5)
        cov += var * np.outer(u, u)
    entry = pca.analyze_layer(layer_of(stats_with_covariance(cov, np.full(8, 1 / 8))), 4, "pca", 8, "importance",
                              0.5, 2)
    np.testing.assert_allclose(entry["explained_variance_ratio"][:4], variances / variances.sum(), atol=1e-9)
    np.testing.assert_allclose(entry["explained_variance_ratio"][4:], 0, atol=1e-9)
    # Importance of each expert = |1/sqrt 2| x its direction's ratio; within a pair the lower index first.
    assert pca.ranking(np.array(entry["importance"])).tolist() == [2, 5, 0, 7, 1, 6, 3, 4]
    assert entry["selected_experts"] == [2, 5, 0, 7]
    np.testing.assert_allclose(entry["weights"], [0.4 / 1.4, 0.4 / 1.4, 0.3 / 1.4, 0.3 / 1.4])
    np.testing.assert_allclose(entry["importance"][2], 0.2)  # 0.4 / 2 of the total
    assert entry["top4_share"] == pytest.approx(0.7) and entry["category"] == "moderate"


def test_pca_score_uses_only_the_top_components():
    d = np.array([8.0, 1.0, 6.0, 2.0, 7.0, 3.0, 5.0, 4.0]) * 1e-3  # independent experts: eigenvectors = experts
    stats = layer_of(stats_with_covariance(np.diag(d), np.full(8, 1 / 8)))
    full = pca.analyze_layer(stats, 8, "pca", 8, "equal", 0.5, 2)
    assert full["selected_experts"] == np.argsort(-d).tolist()
    np.testing.assert_allclose(full["importance"], d / d.sum())
    top3 = pca.analyze_layer(stats, 8, "pca", 3, "equal", 0.5, 2)
    assert sorted(np.flatnonzero(top3["importance"])) == [0, 2, 4]


def test_frequency_and_gate_importance():
    counts, gates = np.array([10, 40, 0, 30, 20.0]), np.array([1, 2, 8, 3, 4.0])
    stats = layer_of(stats_with_covariance(np.eye(5) * 1e-3, np.full(5, 0.2), topk_count=counts, gate_sum=gates))
    freq = pca.analyze_layer(stats, 2, "frequency", 5, "importance", 0.5, 2)
    assert freq["selected_experts"] == [1, 3] and freq["weights"] == pytest.approx([4 / 7, 3 / 7])
    np.testing.assert_allclose(freq["routed_share"], counts / (1000 * 2))
    gate = pca.analyze_layer(stats, 3, "gate", 5, "equal", 0.5, 2)
    assert gate["selected_experts"] == [2, 4, 3] and gate["weights"] == pytest.approx([1 / 3] * 3)


@pytest.mark.parametrize("share,expected", [
    (0.95, "steep_cliff"), (0.71, "steep_cliff"), (0.70, "moderate"), (0.51, "moderate"), (0.50, "gradual"),
    (0.36, "gradual"), (0.35, "even"), (0.115, "even"),
])
def test_categories_follow_the_seeds_thresholds(share, expected):
    assert pca.category(share)[0] == expected


def test_recommended_k_per_category_and_cap():
    assert [pca.recommended_k(pca.category(s)[1], 128) for s in (0.8, 0.6, 0.4, 0.1)] == [4, 8, 16, 24]
    assert pca.recommended_k(pca.category(0.1)[1], 8) == 8
    summary = pca.summarize({"0": {"top4_share": 0.5, "top24_share": 1.0, "category": "gradual"}}, 8)
    assert summary["recommended_top_k"] == 8 and "capped at 8" in summary["notes"][0]


def test_auto_k_on_steep_and_even_curves():
    steep = pca.normalize(np.array([50, 20, 10, 5] + [15 / 28] * 28))
    assert pca.category(pca.top_share(steep, 4))[0] == "steep_cliff" and pca.auto_k(steep) == 4
    assert pca.auto_k(pca.normalize(np.ones(32))) == 24  # even: 16 hold half, the category asks for >= 24
    assert pca.auto_k(pca.normalize(np.ones(128))) == 64  # even: half of the importance
    assert pca.auto_k(pca.normalize(np.ones(128)), auto_share=0.1) == 24
    assert pca.auto_k(pca.normalize(np.ones(8))) == 8  # capped at the expert count
    gradual = pca.normalize(np.array([12, 11, 10, 9] + [58 / 28] * 28))
    assert pca.category(pca.top_share(gradual, 4))[0] == "gradual" and 8 <= pca.auto_k(gradual) <= 16


def synthetic_stats(layers: int, experts: int, tokens: int = 400, seed: int = 0) -> RouterStats:
    g = torch.Generator().manual_seed(seed)
    stats = RouterStats(list(range(layers)), experts, 2, "qwen3_moe", "synthetic")
    for layer in range(layers):
        logits = torch.randn(tokens, experts, generator=g) * 2 + torch.randn(experts, generator=g) * (1 + layer)
        w, i = torch.topk(torch.softmax(logits, -1), 2)
        stats.update(layer, logits, w, i)
    return stats


def test_analyze_command_writes_design_format_and_plots(tmp_path):
    synthetic_stats(3, 40).save(tmp_path / "rs.safetensors")
    out = tmp_path / "out" / "pca_stats.json"
    r = run_main("analyze", "--input", tmp_path / "rs.safetensors", "--output", out, "--top-k", 24,
                 "--merge-weights", "importance")
    assert r.returncode == 0, r.stderr
    assert "top-4 share" in r.stdout and "top-24 share" in r.stdout
    result = json.loads(out.read_text())
    assert (result["format"], result["version"], result["num_experts"], result["routing_top_k"], result["tokens"]) == \
        ("nexus-pca-stats", 1, 40, 2, 400)
    assert result["selection"]["top_k"] == 24 and result["selection"]["importance"] == "pca"
    assert set(result["summary"]) >= {"top4_share", "top24_share", "category", "recommended_top_k"}
    assert list(result["layers"]) == ["0", "1", "2"]
    for entry in result["layers"].values():
        assert len(entry["selected_experts"]) == len(entry["weights"]) == 24
        assert len(set(entry["selected_experts"])) == 24 and sum(entry["weights"]) == pytest.approx(1.0)
        assert len(entry["explained_variance_ratio"]) == 40 and sum(entry["importance"]) == pytest.approx(1.0)
        assert entry["category"] in {c[0] for c in pca.CATEGORIES}
    plots = sorted(p.name for p in (tmp_path / "out" / "plots").iterdir())
    assert plots == ["explained_variance.png", "importance_heatmap.png", "importance_rank.png",
                     "selected_experts.png", "summary.md"]
    assert all((tmp_path / "out" / "plots" / p).stat().st_size > 1000 for p in plots if p.endswith(".png"))
    assert "top-24 share" in (tmp_path / "out" / "plots" / "summary.md").read_text()
    # Fewer experts than 24: --top-k 24 is refused; the category's recommendation is capped, and said so.
    synthetic_stats(2, 8).save(tmp_path / "small.safetensors")
    r = run_main("analyze", "--input", tmp_path / "small.safetensors", "--output", tmp_path / "small.json",
                 "--top-k", 24, "--no-plots")
    assert r.returncode == 2 and "--top-k 24 is larger than the 8 experts" in r.stderr
    r = run_main("analyze", "--input", tmp_path / "small.safetensors", "--output", tmp_path / "small.json",
                 "--top-k", 8, "--no-plots")
    assert r.returncode == 0 and "capped at 8" in r.stdout
    small = json.loads((tmp_path / "small.json").read_text())
    assert all(len(e["selected_experts"]) == 8 for e in small["layers"].values())


@pytest.mark.parametrize("case", ["corrupted", "truncated", "not_stats", "expert_mismatch", "no_tokens", "bad_top_k"])
def test_analyze_bad_inputs(case, tmp_path):
    src = tmp_path / "rs.safetensors"
    extra = []
    if case == "corrupted":
        src.write_bytes(b"garbage" * 10)
    elif case == "truncated":
        synthetic_stats(2, 8).save(src)
        src.write_bytes(src.read_bytes()[:-100])
    elif case == "not_stats":
        from safetensors.torch import save_file

        save_file({"x": torch.zeros(2)}, str(src), metadata={"format": "pt"})
    elif case == "expert_mismatch":
        synthetic_stats(2, 16).save(src)
        tiny_config("qwen3_moe").save_pretrained(str(tmp_path / "model"))
        extra = ["--model", tmp_path / "model"]
    elif case == "no_tokens":
        RouterStats([0], 8, 2, "qwen3_moe").save(src)
    else:
        synthetic_stats(2, 8).save(src)
        extra = ["--top-k", "0"]
    out = tmp_path / "out" / "pca_stats.json"
    r = run_main("analyze", "--input", src, "--output", out, *extra)
    expected = {"corrupted": "not a readable safetensors file", "truncated": "not a readable safetensors file",
                "not_stats": "not NEXUS router statistics", "expert_mismatch": "16 experts per layer, but --model",
                "no_tokens": "hold no tokens", "bad_top_k": "expected a positive integer or 'auto'"}[case]
    assert r.returncode == 2 and expected in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()


def test_pipeline_sample_collect_analyze(tmp_path):
    """The three stages chained; collect as its own `python -m nexus` process (sample's and torchrun's
    subprocess runs are in their own tests)."""
    model = save_model_dir(tmp_path / "model", "olmoe")
    rng = random.Random(3)
    data = write_jsonl(tmp_path / "data.jsonl", [{"text": random_text(rng, 5, 60)} for _ in range(40)])
    r = run_main("sample", "--dataset", data, "--tokenizer", model, "--output", tmp_path / "sample.jsonl",
                "--target-tokens", 400, "--seq-len", 32)
    assert r.returncode == 0, r.stderr
    r = run_cli("collect", "--model", model, "--dataset", tmp_path / "sample.jsonl", "--output",
                tmp_path / "router_stats.safetensors", "--target-tokens", 300, "--batch-size", 4, "--seq-len", 32)
    assert r.returncode == 0, r.stderr
    assert "collected router statistics of 300 tokens" in r.stdout and "tok/s" in r.stderr
    r = run_main("analyze", "--input", tmp_path / "router_stats.safetensors", "--output", tmp_path / "pca_stats.json",
                "--model", model)
    assert r.returncode == 0, r.stderr
    result = json.loads((tmp_path / "pca_stats.json").read_text())
    assert result["model_type"] == "olmoe" and result["tokens"] == 300 and list(result["layers"]) == ["0", "1"]
    assert (tmp_path / "plots" / "importance_heatmap.png").is_file()


def _overlapping(labels) -> list[tuple[str, str]]:
    boxes = [(t.get_text(), t.get_window_extent()) for t in labels if t.get_text() and t.get_visible()]
    return [(a, b) for (a, ba), (b, bb) in zip(boxes, boxes[1:]) if ba.x1 > bb.x0]


@pytest.mark.parametrize("layers, experts", [(4, 32), (24, 128), (2, 8)])
def test_expert_labels_never_overlap(layers, experts):
    from nexus.stats import plots
    from nexus.stats.analyze import analyze_stats

    result = analyze_stats(synthetic_stats(layers, experts), top_k=4)
    for draw in (plots.plot_importance_heatmap, plots.plot_selected):
        fig = draw(result)
        fig.canvas.draw()
        ax = fig.axes[0]
        ticks = [int(t.get_text()) for t in ax.get_xticklabels()]
        assert _overlapping(ax.get_xticklabels()) == [], (draw.__name__, ticks)
        assert ticks[0] == 0 and len(ticks) >= min(experts, 8)  # still a useful number of labels


def test_explained_variance_names_each_of_a_few_layers_and_bands_many():
    from nexus.stats import plots
    from nexus.stats.analyze import analyze_stats

    fig = plots.plot_explained_variance(analyze_stats(synthetic_stats(4, 32), top_k=4))
    assert len(fig.axes) == 1  # no continuous colour bar for 4 discrete layers
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == [f"layer {i}" for i in range(4)]
    fig = plots.plot_explained_variance(analyze_stats(synthetic_stats(24, 16, tokens=64), top_k=4))
    bar = fig.axes[1]  # a colour bar with one band per layer
    assert fig.axes[0].get_legend() is None and [t.get_text() for t in bar.get_yticklabels()][:2] == ["0", "2"]


def test_plots_are_drawn_without_pyplot(tmp_path):
    """Figures of their own: pyplot (and its global backend switch) is never imported."""
    script = ("import sys; sys.path.insert(0, sys.argv[2]); from pathlib import Path\n"
              "from test_analyze import synthetic_stats\n"
              "from nexus.stats import plots\nfrom nexus.stats.analyze import analyze_stats\n"
              "paths = plots.write_all(analyze_stats(synthetic_stats(4, 32), top_k=4), Path(sys.argv[1]))\n"
              "print(all(p.read_bytes()[:4] == b'\\x89PNG' for p in paths if p.suffix == '.png'), "
              "'matplotlib.pyplot' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", script, str(tmp_path), str(Path(__file__).parent)],
                       env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["True", "False"]
