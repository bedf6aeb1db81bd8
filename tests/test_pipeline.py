"""`nexus pipeline`: every stage from one YAML file on a tiny model; skipping, --only, --from, configs."""

from __future__ import annotations

import json
import re
import random
from pathlib import Path

import pytest
import yaml

from nexus.errors import NexusError
from nexus.pipeline.runner import STAGES, Context, build_stage_args, load_pipeline_config, run_pipeline, stage_argv

from tiny import random_text, save_model_dir, write_jsonl

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "nexus" / "configs"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    save_model_dir(root / "model", "gpt_oss")
    rng = random.Random(0)
    write_jsonl(root / "data.jsonl", [{"text": random_text(rng, 8, 40)} for _ in range(60)])
    cfg = {
        "model": str(root / "model"), "dataset": str(root / "data.jsonl"), "work_dir": str(root / "out"),
        "stages": {
            "sample": {"target_tokens": 600, "max_candidates": 60, "seq_len": 32},
            "collect": {"target_tokens": 600, "batch_size": 4, "seq_len": 32},
            "analyze": {"top_k": 2},
            "convert": {"init_strategy": "pca_top2"},
            # best/ (the general-loss guard) is what validate then reads
            "train": {"max_steps": 3, "batch_size": 2, "seq_len": 16, "checkpoint_interval": 2,
                      "eval_dataset": str(root / "data.jsonl"), "general_eval_dataset": str(root / "data.jsonl")},
            "validate": {"dataset": [f"general={root / 'data.jsonl'}"], "compute_perplexity": True,
                         "num_samples": 4, "seq_len": 16},
        },
    }
    (root / "pipeline.yaml").write_text(yaml.safe_dump(cfg))
    ran = run_pipeline(load_pipeline_config(root / "pipeline.yaml"), root)
    return root, cfg, ran


def test_every_stage_runs_and_writes_its_output(tiny_run):
    root, cfg, ran = tiny_run
    assert ran == ["sample", "collect", "analyze", "convert", "train", "validate"]
    out = root / "out"
    for name in ("sample.jsonl", "router_stats.safetensors", "pca_stats.json", "adapter/nexus_config.json",
                 "train/final/nexus_adapter.safetensors", "train/best/nexus_adapter.safetensors",
                 "validation/report.json"):
        assert (out / name).exists(), name
    adapter = json.loads((out / "adapter" / "nexus_config.json").read_text())
    assert adapter["init_strategy"] == "pca_top2"
    report = json.loads((out / "validation" / "report.json").read_text())
    assert report["format"] == "nexus-validation" and "general" in report["datasets"]
    assert report["model"].endswith("train/best")  # train kept best/ (general_eval_dataset): validate reads it


def test_finished_stages_are_skipped(tiny_run, capsys):
    root, cfg, _ = tiny_run
    assert run_pipeline(load_pipeline_config(root / "pipeline.yaml"), root) == []
    assert capsys.readouterr().out.count("complete, skipping") == 6


def test_only_reruns_one_stage_and_keeps_the_previous_output(tiny_run):
    root, cfg, _ = tiny_run
    before = (root / "out" / "pca_stats.json").read_text()
    assert run_pipeline(load_pipeline_config(root / "pipeline.yaml"), root, only="analyze") == ["analyze"]
    assert (root / "out" / "pca_stats.json.previous").read_text() == before
    assert json.loads((root / "out" / "pca_stats.json").read_text()) == json.loads(before)


def test_from_plans_the_later_stages(tiny_run, capsys):
    root, cfg, _ = tiny_run
    run_pipeline(load_pipeline_config(root / "pipeline.yaml"), root, start="train", dry_run=True)
    out = capsys.readouterr().out
    assert "train: nexus train" in out and "validate: nexus validate" in out and "collect: nexus" not in out


@pytest.mark.parametrize("config", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(config, tmp_path):
    assert config.read_text().startswith("# nexus ")  # opens with the command that runs it
    cfg = load_pipeline_config(config)
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
        load_pipeline_config(path)


def test_unknown_stage_option_names_the_stage(tmp_path):
    cfg = {"model": "m", "work_dir": str(tmp_path), "stages": {"analyze": {"top_kk": 3}}}
    ctx = Context(cfg, tmp_path)
    with pytest.raises(NexusError, match="stage 'analyze': unrecognized arguments: --top-kk 3"):
        build_stage_args("analyze", stage_argv(ctx, "analyze"))


# ---------------------------------------------------------------------- checks before anything is written

def _demo_like(tmp_path, **stages) -> Path:
    """A config on the bundled demo model and corpus (whose splits are written on first use)."""
    cfg = {"model": "nexus-demo:model", "work_dir": str(tmp_path / "work"),
           "stages": {"sample": {"dataset": "nexus-demo:data/general_train", "target_tokens": 500},
                      "collect": {"target_tokens": 500}, "analyze": {"top_k": 2},
                      "convert": {"init_strategy": "pca_top2"},
                      "train": {"dataset": "nexus-demo:data/domain_train", "max_steps": 2},
                      "validate": {"dataset": ["nexus-demo:data/domain_eval"]}}}
    for name, opts in stages.items():
        if opts is None:
            del cfg["stages"][name]
        else:
            cfg["stages"][name].update(opts)
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("stages, message", [
    ({"train": {"batch_size": 0}}, "stage 'train': --batch-size must be at least 1, got 0"),
    ({"train": {"max_steps": "many"}}, "stage 'train': argument --max-steps: invalid int value: 'many'"),
    ({"train": {"max_step": 5}}, r"stages.train.max_step: `nexus train` has no option --max-step \(did you mean "
                                 r"max_steps\?\)"),
    ({"collect": {"seq": 64}}, "stages.collect.seq: `nexus collect` has no option --seq"),  # no prefix matching
    ({"validate": {"num_samples": 0}}, "stage 'validate': --num-samples must be >= 1, got 0"),
    ({"convert": None}, "stage 'train' needs --student-model: add a 'convert' stage, or set stages.train.student_model"),
    ({"sample": None}, "stage 'collect' needs --dataset: add a 'sample' stage"),
    ({"analyze": None}, "stage 'convert' needs --pca-stats: add a 'analyze' stage"),  # pca_top2 merges experts
    ({"convert": {"init_strategy": "pca24"}}, "stage 'convert': --init-strategy 'pca24': unknown init strategy"),
])
def test_a_bad_config_fails_in_one_line_before_anything_is_written(tmp_path, stages, message):
    from tiny import run_main

    config = _demo_like(tmp_path, **stages)
    r = run_main("pipeline", config)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {config}: "), r.stderr
    assert re.search(message, lines[0]), lines[0]
    assert "usage:" not in r.stderr and r.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.yaml"]  # no work_dir, no demo data


@pytest.mark.parametrize("key", ["model", "dataset"])
def test_a_missing_model_or_dataset_is_refused_before_anything_is_written(tmp_path, key):
    from tiny import run_main

    cfg = yaml.safe_load(_demo_like(tmp_path).read_text())
    cfg[key] = str(tmp_path / "nowhere")
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(cfg))
    r = run_main("pipeline", tmp_path / "p.yaml")
    assert r.returncode == 2 and r.stderr == f"error: {tmp_path / 'p.yaml'}: {key} {tmp_path / 'nowhere'}: no such " \
                                            f"file or directory\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.yaml"]


def test_a_stage_whose_input_is_not_made_is_refused_with_from(tmp_path):
    from tiny import run_main

    r = run_main("pipeline", _demo_like(tmp_path), "--from", "train")
    assert r.returncode == 2 and "stage 'train' needs --student-model" in r.stderr and "--from convert" in r.stderr
    assert not (tmp_path / "work").exists()


def test_a_random_init_needs_no_router_statistics(tmp_path):
    from tiny import run_main

    config = _demo_like(tmp_path, sample=None, collect=None, analyze=None, convert={"init_strategy": "random"})
    cfg = yaml.safe_load(config.read_text())
    del cfg["stages"]["convert"]["init_strategy"]  # convert's default
    config.write_text(yaml.safe_dump(cfg))
    r = run_main("pipeline", config, "--dry-run")
    assert r.returncode == 0, r.stderr
    convert_line = next(ln for ln in r.stdout.splitlines() if "nexus convert" in ln)
    assert "--pca-stats" not in convert_line and "--output" in convert_line


def test_dry_run_writes_nothing(tmp_path):
    from tiny import run_main

    r = run_main("pipeline", _demo_like(tmp_path), "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "train: nexus train" in r.stdout and not (tmp_path / "work").exists()


@pytest.mark.parametrize("convert, wired", [({"init_strategy": "pruned_top2"}, True),
                                            ({"init_strategy": "feature_top4", "width_multiplier": 2}, True),
                                            ({"init_strategy": "pruned_top2", "width_multiplier": 2}, False),
                                            ({"init_strategy": "pca_top2"}, False),
                                            ({"init_strategy": "pca_top2", "width_multiplier": 0.5}, True),
                                            ({"init_strategy": "concat_top2"}, False)])
def test_collect_keep_hidden_feeds_convert_hidden_sample_where_it_ranks_units(tmp_path, convert, wired):
    from tiny import run_main

    config = _demo_like(tmp_path, collect={"keep_raw": 64, "keep_hidden": True}, convert=convert)
    r = run_main("pipeline", config, "--dry-run")
    assert r.returncode == 0, r.stderr
    convert_line = next(ln for ln in r.stdout.splitlines() if "nexus convert" in ln)
    sample = str(tmp_path / "work" / "router_stats.raw.safetensors")
    assert (f"--hidden-sample {sample}" in convert_line) == wired, convert_line
