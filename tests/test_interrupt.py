"""Ctrl-C and reruns: a partial output is resumed or refused with the exact commands, and the
command Ctrl-C prints continues to the result an uninterrupted run gives."""

from __future__ import annotations

import re
import shlex
import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

from nexus.stats.accumulate import FIELDS, RouterStats
from tiny import run_main, save_model_dir, sigint_default, slowed, subprocess_env, write_text_dataset
from tiny import single_thread  # noqa: F401  (autouse: one thread, as the subprocesses)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("interrupt")
    return save_model_dir(root / "model"), write_text_dataset(root / "data.jsonl", n=48)


def _ok(*args):
    r = run_main(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def ctrl_c(cmd: list[str], ready, timeout: float = 120) -> str:
    """Run `cmd`, send SIGINT once `ready()` holds; returns its stderr (the run must exit 130)."""
    proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=sigint_default)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before the interruption"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-3000:]
    return err


def printed_command(stderr: str) -> list[str]:
    """The argv of the `nexus ...` command in the last line (`interrupted; ... continue with: nexus ...`)."""
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("interrupted; "), stderr[-2000:]
    command = last.split("continue with: ", 1)[1]
    argv = shlex.split(command)
    assert argv[0] == "nexus"
    return argv[1:]


def test_ctrl_c_in_collect_prints_the_command_that_resumes_to_the_same_statistics(files, tmp_path):
    model, data = files
    args = ["collect", "--model", model, "--dataset", data, "--seq-len", 16, "--batch-size", 2, "--target-tokens", 0,
            "--flush-every", 1, "--device", "cpu"]
    ref = tmp_path / "ref.safetensors"
    _ok(*args, "--output", ref)

    out = tmp_path / "stats.safetensors"
    partial = tmp_path / "stats.partial.safetensors"
    # 0.3 s per batch: ~10 s between the first flush and the end, time for a busy machine to notice
    err = ctrl_c(slowed("nexus.stats.collect", 0.3, ["_forward"], *args, "--output", out), partial.is_file)
    assert f"{partial} holds the statistics of the first" in err and not out.exists()
    again = printed_command(err)
    assert again == [str(a) for a in args] + ["--output", str(out), "--resume"]

    # A rerun without --resume neither starts from zero nor touches the partial run: it names both commands.
    before = partial.read_bytes()
    r = run_main(*args, "--output", out)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert f"continue it with: nexus {shlex.join(again)}" in r.stderr
    assert f"start over with: nexus {shlex.join([str(a) for a in args] + ['--output', str(out), '--overwrite'])}" \
        in r.stderr
    assert partial.read_bytes() == before and not out.exists()

    _ok(*again)
    a, b = RouterStats.load(out)[0], RouterStats.load(ref)[0]
    assert a.tokens == b.tokens and all(torch.equal(a.sums[i][f], b.sums[i][f]) for i in a.moe_layers for f in FIELDS)
    assert not partial.exists()


def test_collect_overwrite_discards_the_partial_run(files, tmp_path):
    model, data = files
    args = ["collect", "--model", model, "--dataset", data, "--seq-len", 16, "--target-tokens", 64, "--device", "cpu",
            "--output", tmp_path / "s.safetensors"]
    partial = tmp_path / "s.partial.safetensors"
    partial.write_bytes(b"left by an interrupted run")
    _ok(*args, "--overwrite")
    assert not partial.exists() and RouterStats.load(tmp_path / "s.safetensors")[0].tokens == 64


def test_ctrl_c_in_train_prints_the_command_that_resumes_to_the_same_adapter(files, tmp_path):
    model, data = files
    args = ["train", "--student-model", model, "--init-strategy", "random", "--dataset", data, "--seq-len", 32,
            "--batch-size", 2, "--max-steps", 6, "--learning-rate", 3e-3, "--checkpoint-interval", 2,
            "--logging-steps", 1000, "--device", "cpu"]
    _ok(*args, "--output-dir", tmp_path / "ref")

    out = tmp_path / "run"
    # each checkpoint save is followed by 6 s, so the interruption lands after checkpoint-2 (or, on a
    # machine too busy to notice it in time, a later one), before the end
    err = ctrl_c(slowed("nexus.train.checkpoint", 6.0, ["save"], *args, "--output-dir", out),
                 lambda: (out / "checkpoint-2").is_dir())
    assert re.search(r"/checkpoint-[24] is the latest checkpoint; ", err) and not (out / "final").exists(), err
    again = printed_command(err)
    assert again == [str(a) for a in args] + ["--output-dir", str(out), "--resume-from-checkpoint", "latest"]

    r = run_main(*args, "--output-dir", out)  # without the resume flag: refused, naming the command
    assert r.returncode == 2 and "holds an interrupted run (last checkpoint: checkpoint-" in r.stderr
    assert f"continue it with: nexus {shlex.join(again)}" in r.stderr

    _ok(*again)
    # the same weights (not bytes: safetensors writes its metadata in a per-process hash order)
    got, ref = (load_file(str(d / "final" / "nexus_adapter.safetensors")) for d in (out, tmp_path / "ref"))
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)


def test_a_finished_train_run_is_not_silently_reused(files, tmp_path):
    model, data = files
    out = tmp_path / "done"
    (out / "final").mkdir(parents=True)
    r = run_main("train", "--student-model", model, "--dataset", data, "--output-dir", out)
    assert r.returncode == 2 and f"--output-dir {out} holds a finished run" in r.stderr


def test_ctrl_c_in_pipeline_and_precompute_name_the_command_that_continues():
    from argparse import Namespace

    from nexus.pipeline import cli as pipeline
    from nexus.teacher import cli as teacher_cli

    hint = pipeline.interrupted(Namespace(argv=["pipeline", "p.yaml", "--from", "train"]))
    assert hint.endswith("continue with: nexus pipeline p.yaml (it skips them; an interrupted collect or train "
                         "resumes)")
    hint = teacher_cli.interrupted(Namespace(argv=["precompute-teacher", "--output", "c d"], output="c d"))
    assert hint.endswith("continue with the same command: nexus precompute-teacher --output 'c d'")


@pytest.mark.parametrize("argv", [
    ["sample", "--dataset", "d.jsonl", "--tokenizer", "t", "--output", "s.jsonl"],
    ["analyze", "--input", "s.safetensors", "--output", "p.json"],
    ["convert", "--input", "m", "--output", "adapter dir", "--init-strategy", "zero"],
])
def test_ctrl_c_in_an_atomic_verb_says_nothing_was_written(argv):
    from nexus.cli import build_parser, interrupted_hint

    args = build_parser().parse_args(argv)
    args.argv = argv
    output = argv[argv.index("--output") + 1]
    assert interrupted_hint(args) == (f"nothing was written to {output} (it appears only once complete); start "
                                      f"again with: nexus {shlex.join(argv)}")
