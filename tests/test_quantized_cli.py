"""The verbs on quantized miniature checkpoints (MXFP4 gpt-oss, FP8 DeepSeek-V3), from the command line:
collect, train with the online self-teacher, validate, chat; and kill -9 + resume, still bit-exact."""

import json
import math
import random
import subprocess

import pytest
from quant_checkpoints import write_fp8_checkpoint, write_mxfp4_gpt_oss
from safetensors import safe_open
from safetensors.torch import load_file
from tiny import kill_after_step, nexus_cmd, random_text, run_cli, subprocess_env, write_jsonl

from nexus.train.metrics import read_metrics

BASES = {"mxfp4": write_mxfp4_gpt_oss, "fp8": lambda d: write_fp8_checkpoint("deepseek_v3", d, "per_expert")}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rng = random.Random(0)
    return write_jsonl(tmp_path_factory.mktemp("data") / "data.jsonl", [{"text": random_text(rng, 20, 40)}
                                                                        for _ in range(24)])


@pytest.fixture(scope="module", params=list(BASES))
def base(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(f"base-{request.param}")
    BASES[request.param](d)
    return d


def ok(*args):
    out = run_cli(*args)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_collect_train_validate_chat_on_a_quantized_base(base, data, tmp_path):
    ok("collect", "--model", base, "--dataset", data, "--output", tmp_path / "stats.safetensors", "--seq-len", 32,
       "--batch-size", 4, "--target-tokens", 256, "--device", "cpu")
    with safe_open(str(tmp_path / "stats.safetensors"), "pt") as f:
        assert int(f.metadata()["tokens"]) >= 256
        layers = json.loads(f.metadata()["moe_layers"])
        assert all(f.get_tensor(f"layers.{i}.count").item() >= 256 for i in layers)

    ok("train", "--student-model", base, "--init-strategy", "random", "--width-multiplier", 0.5, "--dataset", data,
       "--seq-len", 32, "--max-steps", 3, "--logging-steps", 1, "--checkpoint-interval", 3, "--device", "cpu",
       "--gradient-checkpointing", "--output-dir", tmp_path / "run")
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and r["kl"] >= 0 for r in rows)  # the self-teacher ran on the packed base
    cfg = json.loads((tmp_path / "run" / "final" / "nexus_config.json").read_text())
    assert cfg["width_multiplier"] == 0.5

    ok("validate", "--model", tmp_path / "run" / "final", "--dataset", f"d={data}", "--compute-perplexity",
       "--seq-len", 32, "--num-samples", 4, "--device", "cpu", "--output", tmp_path / "val")
    report = json.loads((tmp_path / "val" / "report.json").read_text())
    d = report["datasets"]["d"]
    assert math.isfinite(d["perplexity"]) and math.isfinite(d["baseline_perplexity"])

    out = ok("chat", "--model", tmp_path / "run" / "final", "--prompt", "the cat sat", "--max-new-tokens", 4,
             "--device", "cpu", "--seed", 0)
    assert out.stdout.strip()


STEPS, INTERVAL, KILL_AFTER = 24, 6, 8


def test_kill_and_resume_is_bit_exact_on_a_quantized_base(tmp_path, data):
    write_mxfp4_gpt_oss(tmp_path / "base")
    args = ["train", "--student-model", tmp_path / "base", "--init-strategy", "random", "--dataset", data,
            "--seq-len", 32, "--batch-size", 2, "--max-steps", STEPS, "--learning-rate", 3e-3,
            "--checkpoint-interval", INTERVAL, "--logging-steps", 1000, "--device", "cpu"]
    env = subprocess_env()
    ok(*args, "--output-dir", tmp_path / "ref")
    victim = tmp_path / "victim"
    proc = subprocess.Popen(nexus_cmd(*args, "--output-dir", victim), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    kill_after_step(proc, victim / "metrics.jsonl", KILL_AFTER)
    ok(*args, "--output-dir", victim, "--resume-from-checkpoint", "latest")
    expected, got = read_metrics(tmp_path / "ref" / "metrics.jsonl"), read_metrics(victim / "metrics.jsonl")
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    for a, b in zip(expected, got):
        for key in ("loss", "ce", "kl", "grad_norm", "lr"):
            assert a[key] == b[key], (a["step"], key, a[key], b[key])
    final_a = load_file(str(tmp_path / "ref" / "final" / "nexus_adapter.safetensors"))
    final_b = load_file(str(victim / "final" / "nexus_adapter.safetensors"))
    assert final_a.keys() == final_b.keys() and all((final_a[k] == final_b[k]).all() for k in final_a)
