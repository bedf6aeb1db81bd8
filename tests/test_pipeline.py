"""`nexus pipeline`: every stage from one YAML file on a tiny model; skipping, --only, --from, configs."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import yaml

from nexus.errors import NexusError
from nexus.pipeline import STAGES, Context, build_stage_args, load_config, run_pipeline, stage_argv

from tiny_assets import random_text, save_tiny_model, write_jsonl

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "nexus" / "configs"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    save_tiny_model("gpt_oss", root / "model")
    rng = random.Random(0)
    write_jsonl(root / "data.jsonl", [{"text": random_text(rng, 8, 40)} for _ in range(60)])
    cfg = {
        "model": str(root / "model"), "dataset": str(root / "data.jsonl"), "work_dir": str(root / "out"),
        "stages": {
            "sample": {"target_tokens": 600, "max_candidates": 60, "seq_len": 32},
            "collect": {"target_tokens": 600, "batch_size": 4, "seq_len": 32},
            "analyze": {"top_k": 2},
            "convert": {"init_strategy": "pca_top2"},
            "train": {"max_steps": 3, "batch_size": 2, "seq_len": 16, "checkpoint_interval": 2},
            "validate": {"dataset": [f"general={root / 'data.jsonl'}"], "compute_perplexity": True,
                         "num_samples": 4, "seq_len": 16},
        },
    }
    (root / "pipeline.yaml").write_text(yaml.safe_dump(cfg))
    ran = run_pipeline(load_config(root / "pipeline.yaml"), root)
    return root, cfg, ran


def test_every_stage_runs_and_writes_its_output(tiny_run):
    root, cfg, ran = tiny_run
    assert ran == ["sample", "collect", "analyze", "convert", "train", "validate"]
    out = root / "out"
    for name in ("sample.jsonl", "router_stats.safetensors", "pca_stats.json", "adapter/nexus_config.json",
                 "train/final/nexus_adapter.safetensors", "validation/report.json"):
        assert (out / name).exists(), name
    adapter = json.loads((out / "adapter" / "nexus_config.json").read_text())
    assert adapter["init_strategy"] == "pca_top2"
    report = json.loads((out / "validation" / "report.json").read_text())
    assert report["format"] == "nexus-validation" and "general" in report["datasets"]


def test_finished_stages_are_skipped(tiny_run, capsys):
    root, cfg, _ = tiny_run
    assert run_pipeline(load_config(root / "pipeline.yaml"), root) == []
    assert capsys.readouterr().out.count("complete, skipping") == 6


def test_only_reruns_one_stage_and_keeps_the_previous_output(tiny_run):
    root, cfg, _ = tiny_run
    before = (root / "out" / "pca_stats.json").read_text()
    assert run_pipeline(load_config(root / "pipeline.yaml"), root, only="analyze") == ["analyze"]
    assert (root / "out" / "pca_stats.json.previous").read_text() == before
    assert json.loads((root / "out" / "pca_stats.json").read_text()) == json.loads(before)


def test_from_plans_the_later_stages(tiny_run, capsys):
    root, cfg, _ = tiny_run
    run_pipeline(load_config(root / "pipeline.yaml"), root, start="train", dry_run=True)
    out = capsys.readouterr().out
    assert "train: nexus train" in out and "validate: nexus validate" in out and "collect: nexus" not in out


@pytest.mark.parametrize("config", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(config, tmp_path):
    assert config.read_text().startswith("# nexus ")  # opens with the command that runs it
    cfg = load_config(config)
    cfg["work_dir"] = str(tmp_path)
    ctx = Context(cfg, tmp_path)
    for name in STAGES:
        if name in cfg["stages"]:
            build_stage_args(name, stage_argv(ctx, name))  # the verb's own parser accepts every option


@pytest.mark.parametrize("text, message", [
    ("model: m\nstages: {sampel: {}}\n", "unknown stage 'sampel'"),
    ("stages: {sample: {}}\n", "'model' is required"),
    ("model: m\nstages: {}\n", "'stages' must map"),
    ("model: m\nfoo: 1\nstages: {sample: {}}\n", "unknown keys"),
    ("model: [unclosed\n", "not valid YAML"),
])
def test_bad_configs(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(NexusError, match=message):
        load_config(path)


def test_unknown_stage_option_names_the_stage(tmp_path):
    cfg = {"model": "m", "work_dir": str(tmp_path), "stages": {"analyze": {"top_kk": 3}}}
    ctx = Context(cfg, tmp_path)
    with pytest.raises(NexusError, match="pipeline stage 'analyze': invalid options"):
        build_stage_args("analyze", stage_argv(ctx, "analyze"))
