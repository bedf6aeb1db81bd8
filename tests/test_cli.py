"""The `nexus` command line: help texts, `nexus plan` on the real gpt-oss-20b config, error exits."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import pytest

from nexus.cli import build_parser
from nexus.verbs import VERBS

import tiny
from conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]
GPT_OSS_20B = ROOT / "tests" / "data" / "gpt-oss-20b"  # real config.json + index of gpt-oss-20b


def run_cli(capsys, *args):
    """Run `nexus ARGS` in this process; returns (exit code, stdout, stderr)."""
    from nexus.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def _subparsers(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices
    return {}


def test_every_verb_and_flag_has_help():
    parser = build_parser()
    verbs = _subparsers(parser)
    assert set(verbs) == set(VERBS)
    for verb, sub in verbs.items():
        assert sub.description, f"{verb} has no description"
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
                continue
            assert action.help and len(action.help) > 8, f"nexus {verb} {action.option_strings}: no help"


def test_top_level_help_lists_verbs():
    out = tiny.run_cli("--help")
    assert out.returncode == 0
    for verb in VERBS:
        assert verb in out.stdout


def test_plan_on_real_gpt_oss_20b_config(capsys):
    code, stdout, stderr = run_cli(capsys, "plan", "--model", GPT_OSS_20B, "--json")
    assert code == 0, stderr
    plan = json.loads(stdout)
    assert len(plan["moe_layers"]) == 24 and plan["num_experts"] == 32 and plan["routed_top_k"] == 4
    # gate_up [H, 2I] + bias [2I] + down [I, H] + bias [H] with H = I = 2880
    assert plan["shared_params_per_layer"] == 2880 * 5760 + 5760 + 2880 * 2880 + 2880
    assert abs(plan["shared_params_per_layer"] / 1e6 - 24.9) < 0.05
    assert plan["shared_params_total"] == 24 * plan["shared_params_per_layer"]
    assert abs(plan["total_params"] / 1e9 - 20.91) < 0.01  # gpt-oss-20b: 20.9 B parameters
    assert abs(plan["active_params_per_token"] / 1e9 - 3.61) < 0.01  # OpenAI's 3.6 B active
    code, table, _ = run_cli(capsys, "plan", "--model", GPT_OSS_20B / "config.json")
    assert code == 0 and "24 (layers 0..23)" in table and "24.89 M" in table


def test_plan_width_multiplier_scales_shared_params(capsys):
    one = json.loads(run_cli(capsys, "plan", "--model", GPT_OSS_20B, "--json")[1])
    two = json.loads(run_cli(capsys, "plan", "--model", GPT_OSS_20B, "--json", "--width-multiplier", "2")[1])
    # biases of the output projection do not scale with width
    assert two["shared_params_per_layer"] == 2 * one["shared_params_per_layer"] - 2880


def test_plan_on_a_dense_model_is_a_clear_error(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2).save_pretrained(tmp_path)
    out = tiny.run_cli("plan", "--model", tmp_path)
    assert out.returncode == 2
    assert "no MoE layers" in out.stderr and "gpt_oss" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("bad", ["missing-dir", "empty-dir", "bad-json"])
def test_plan_bad_paths(tmp_path, bad, capsys):
    target = tmp_path / "x"
    if bad == "empty-dir":
        target.mkdir()
    elif bad == "bad-json":
        target = tmp_path / "config.json"
        target.write_text("{not json")
    code, _, err = run_cli(capsys, "plan", "--model", target)
    assert code == 2 and str(target) in err


def test_debug_shows_traceback(tmp_path):
    out = tiny.run_cli("--debug", "plan", "--model", tmp_path / "nope")
    assert out.returncode != 0 and "Traceback" in out.stderr


def test_plan_on_tiny_family_configs(tmp_path, family, capsys):
    tiny_config(family).save_pretrained(tmp_path)
    code, out, err = run_cli(capsys, "plan", "--model", tmp_path, "--json")
    assert code == 0, err
    assert json.loads(out)["num_experts"] == 8


@pytest.mark.parametrize("argv, code", [(["plan", "--model", "tests/data/gpt-oss-20b"], 0),
                                        (["plan", "--model", "no/such/dir"], 2)])
def test_a_torchrun_worker_leaves_through_exit_process_with_the_verbs_code(monkeypatch, argv, code, capsys):
    # A worker that joined a process group skips interpreter teardown (see nexus.dist.exit_process),
    # after running the atexit handlers and flushing; its exit code is the verb's.
    import atexit

    from nexus import cli, dist

    ran, left = [], []
    monkeypatch.setattr(dist, "_joined", True)
    monkeypatch.setattr(atexit, "_run_exitfuncs", lambda: ran.append(True))
    monkeypatch.setattr(os, "_exit", lambda c: left.append(c) or sys.exit(c))
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert left == [code] and e.value.code == code and ran == [True]


def test_plan_native_base_is_the_checkpoint_not_its_dequantized_size(capsys):
    from nexus.base.quantized import CHUNK_BYTES

    plan = json.loads(run_cli(capsys, "plan", "--model", GPT_OSS_20B, "--json", "--width-multiplier", "0.25")[1])
    released = json.loads((GPT_OSS_20B / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    mem = plan["memory_bytes"]
    assert plan["quantization"] == "mxfp4" and plan["width_multiplier"] == 0.25
    assert abs(mem["base_native"] - CHUNK_BYTES - released) / released < 0.01  # the released shards' bytes
    assert abs(mem["base_dequantized"] / 1e9 - 41.8) < 0.1  # 20.9 B parameters in bf16
    assert mem["train_native_base"] == mem["base_native"] + mem["trainable_optimizer_state"]
    assert mem["teacher_cache_per_1m_tokens"] == (64 * (2 + 4) + 4 + 1) * 10**6  # top-64 fp16 + int32, id, mask
    assert plan["shared_params_per_layer"] == 2880 * 2 * 704 + 2 * 704 + 704 * 2880 + 2880  # 0.25 -> 704 units


def test_plan_on_a_hub_name_says_to_download_its_config(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no local folder of that name
    code, out, err = run_cli(capsys, "plan", "--model", "openai/gpt-oss-20b")
    assert code == 2 and out == ""
    assert err.strip() == ("error: --model openai/gpt-oss-20b: no such local directory; a hub name is not fetched "
                           "(nexus reads no network): download its config first, e.g. `hf download "
                           "openai/gpt-oss-20b config.json --local-dir gpt-oss-20b`, then pass --model "
                           "gpt-oss-20b")
    code, _, err = run_cli(capsys, "plan", "--model", "./models/gpt-oss-20b")  # a path: no hub advice
    assert code == 2 and "no such model directory" in err and "hub" not in err


@pytest.mark.parametrize("argv, flag", [(["collect", "--seq", "5"], "--seq"),
                                        (["train", "--student-model", "m", "--output-dir", "o", "--max-step", "3"],
                                         "--max-step"),
                                        (["validate", "--model", "m", "--num-sample", "3"], "--num-sample")])
def test_an_abbreviated_flag_is_an_error_not_another_flag(argv, flag, capsys):
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and f"unrecognized arguments: {flag}" in err
