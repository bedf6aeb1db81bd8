"""Kill -9 in the middle of a run, resume from the last checkpoint: the same losses as an uninterrupted run."""

import json
import subprocess

import pytest
from safetensors.torch import load_file

from nexus.cli import main
from nexus.train.metrics import read_metrics
from tiny import kill_after_step, nexus_cmd, save_model_dir, subprocess_env, write_text_dataset
from tiny import single_thread  # noqa: F401  (autouse: one thread, as the subprocesses)

STEPS, INTERVAL, KILL_AFTER = 40, 8, 10


def test_kill_and_resume_continues_exactly(tmp_path):
    model_dir = save_model_dir(tmp_path / "model")
    data = write_text_dataset(tmp_path / "data.jsonl", n=24)
    args = ["train", "--student-model", model_dir, "--init-strategy", "random", "--dataset", data, "--seq-len", 32,
            "--batch-size", 2, "--gradient-accumulation-steps", 2, "--max-steps", STEPS, "--learning-rate", 3e-3,
            "--checkpoint-interval", INTERVAL, "--save-total-limit", 2, "--use-advanced-scheduler",
            "--router-kl-weight", 0.1, "--logging-steps", 1000, "--device", "cpu"]
    env = subprocess_env()

    ref = tmp_path / "ref"  # the uninterrupted run, in this process (single-threaded like the subprocesses)
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args] + ["--output-dir", str(ref)])
    assert e.value.code == 0

    victim = tmp_path / "victim"
    proc = subprocess.Popen(nexus_cmd(*args, "--output-dir", victim), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    killed_at = kill_after_step(proc, victim / "metrics.jsonl", KILL_AFTER, timeout=120)
    assert KILL_AFTER <= killed_at < STEPS and not (victim / "final").exists()

    out = subprocess.run(nexus_cmd(*args, "--output-dir", victim, "--resume-from-checkpoint", "latest"), env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    resumed_from = (killed_at // INTERVAL) * INTERVAL
    assert f"resumed from {victim / f'checkpoint-{resumed_from}'} at step {resumed_from}" in out.stderr

    expected, got = read_metrics(ref / "metrics.jsonl"), read_metrics(victim / "metrics.jsonl")
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))  # rows after the checkpoint were replaced
    for a, b in zip(expected, got):
        for key in ("loss", "ce", "kl", "router_kl", "grad_norm", "lr", "temperature", "router_l1"):
            assert a[key] == b[key], (a["step"], key, a[key], b[key])
    final_a = load_file(str(ref / "final" / "nexus_adapter.safetensors"))
    final_b = load_file(str(victim / "final" / "nexus_adapter.safetensors"))
    assert all((final_a[k] == final_b[k]).all() for k in final_a)
    kept = sorted(p.name for p in victim.glob("checkpoint-*"))
    assert kept == [f"checkpoint-{STEPS - 2 * INTERVAL}", f"checkpoint-{STEPS - INTERVAL}"]  # --save-total-limit 2
    assert json.loads((victim / "final" / "trainer_state.json").read_text())["step"] == STEPS
