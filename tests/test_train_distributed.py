"""DDP on CPU (gloo): 2 ranks × accumulation A give the weights of 1 process × accumulation 2A."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from nexus.cli import main
from nexus.train.metrics import read_metrics
from tiny import nexus_cmd, run_main, save_model_dir, subprocess_env, write_text_dataset
from tiny import single_thread  # noqa: F401  (autouse: one thread per test process)


def mxfp4_model_dir(path):
    """gpt-oss with MXFP4 experts as released, which NEXUS keeps packed, and the tokenizer of these tests."""
    from quant_checkpoints import write_mxfp4_gpt_oss

    write_mxfp4_gpt_oss(path)  # saves tiny.make_tokenizer() beside the weights
    return path


@pytest.mark.parametrize("base", ["qwen3_moe", "gpt_oss-mxfp4"])
def test_two_ranks_equal_one_process_with_twice_the_accumulation(tmp_path, base):
    model_dir = save_model_dir(tmp_path / "model") if base == "qwen3_moe" else mxfp4_model_dir(tmp_path / "model")
    data = write_text_dataset(tmp_path / "data.jsonl", n=24)
    general = write_text_dataset(tmp_path / "general.jsonl", n=9, seed=3)  # replayed: 1 micro-batch a rank, 2 alone
    # A trainable router frozen mid-run: DDP is rebuilt at the freeze without unused-parameter errors.
    args = ["train", "--student-model", model_dir, "--init-strategy", "random", "--dataset", data, "--seq-len", 32,
            "--replay-dataset", general, "--replay-weight", 100,  # weighed so that it moves the weights visibly
            "--batch-size", 1, "--max-steps", 4, "--learning-rate", 3e-3, "--checkpoint-interval", 2,
            "--no-freeze-router", "--bias-freeze-ratio", 0.5, "--router-kl-weight", 0.1, "--device", "cpu",
            "--dtype", "float32"]  # the MXFP4 experts stay packed; fp32 rest, so the two runs agree to float tolerance
    env = subprocess_env()
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          *nexus_cmd(*args, "--gradient-accumulation-steps", 2, "--replay-batches", 1,
                                    "--output-dir", tmp_path / "ddp")[1:]],
                         env=env, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    with pytest.raises(SystemExit) as e:  # one process, in this one
        main([str(a) for a in args] + ["--gradient-accumulation-steps", "4", "--replay-batches", "2", "--output-dir",
                                       str(tmp_path / "one")])
    assert e.value.code == 0

    a = load_file(str(tmp_path / "ddp" / "final" / "nexus_adapter.safetensors"))
    b = load_file(str(tmp_path / "one" / "final" / "nexus_adapter.safetensors"))
    assert a.keys() == b.keys() and any(k.endswith(("gate.weight", "router.weight")) for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    rows = zip(read_metrics(tmp_path / "ddp" / "metrics.jsonl"), read_metrics(tmp_path / "one" / "metrics.jsonl"))
    for ra, rb in rows:
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5) and ra["tokens_per_s"] > 0
        # a KL between near-equal fp32 distributions: summation order moves it by ~1e-8
        assert ra["replay_kl"] == pytest.approx(rb["replay_kl"], rel=1e-4, abs=1e-7) and ra["replay_kl"] > 0
    state = json.loads((tmp_path / "ddp" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["global_batch"] == 4 and state["router"]["frozen"] is True
    assert ddp.stderr.count("saved ") == 2  # only rank 0 writes: checkpoint-2 and final


def test_use_ddp_relaunches_under_torchrun(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(subprocess, "call", lambda cmd, env=None: calls.append(cmd) or 0)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit) as e:
        main(["train", "--student-model", "m", "--dataset", "d", "--output-dir", str(tmp_path), "--use-ddp",
              "--nproc", "3", "--max-steps", "5"])
    assert e.value.code == 0
    cmd = calls[0]
    assert cmd[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=3", "-m"]
    assert cmd[6:] == ["nexus", "train", "--student-model", "m", "--dataset", "d", "--output-dir", str(tmp_path),
                       "--max-steps", "5"]


def test_pipeline_with_use_ddp_runs_each_stage_once(tmp_path):
    """Only train runs on 2 ranks (gloo); the pipeline around it, validate included, runs once."""
    import yaml

    model_dir = save_model_dir(tmp_path / "model")
    data = write_text_dataset(tmp_path / "data.jsonl", n=12)
    cfg = {"model": str(model_dir), "dataset": str(data), "work_dir": str(tmp_path / "out"), "stages": {
        "train": {"student_model": str(model_dir), "init_strategy": "random", "use_ddp": True, "nproc": 2,
                  "device": "cpu", "seq_len": 16, "batch_size": 1, "max_steps": 1},
        "validate": {"dataset": [str(data)], "num_samples": 2, "seq_len": 16, "device": "cpu"}}}
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(cfg))
    r = subprocess.run(nexus_cmd("pipeline", tmp_path / "pipeline.yaml"), env=subprocess_env(), capture_output=True,
                       text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    for stage in ("train", "validate"):
        assert r.stdout.count(f"[pipeline] {stage}: done") == 1, r.stdout
    launches = [line for line in r.stdout.splitlines() if line.startswith("launching: ")]
    assert len(launches) == 1 and " -m nexus train " in launches[0], launches
    state = json.loads((tmp_path / "out" / "train" / "final" / "trainer_state.json").read_text())
    assert state["world_size"] == 2
    assert (tmp_path / "out" / "validation" / "report.json").is_file()


def test_pipeline_refuses_to_run_under_torchrun(tmp_path, monkeypatch):
    (tmp_path / "p.yaml").write_text(f"model: m\nwork_dir: {tmp_path}\nstages: {{analyze: {{}}}}\n")
    monkeypatch.setenv("WORLD_SIZE", "2")
    r = run_main("pipeline", tmp_path / "p.yaml")
    assert r.returncode == 2 and "start it without torchrun" in r.stderr
