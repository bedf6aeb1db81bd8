"""Faults: kill -9 mid-stage, a full disk mid-write, a rank dying under torchrun, NaN/Inf.

Each stage must leave nothing corrupt or partial under its final output name, report the fault
clearly, and finish on rerun with the result an uninterrupted run gives. Kill points are drawn from
a seeded generator (NEXUS_FAULT_SEED, default 0; vary it to try other points). Tests already in
the stage files (train and precompute-teacher kill -9, NaN loss, NaN experts in convert, refused
disk room) are listed in docs/reliability.md and not repeated here.
"""

from __future__ import annotations

import errno
import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import nexus
from nexus import adapter as adapter_mod
from nexus.errors import NexusError
from nexus.fsutil import atomic_dir, atomic_path
from nexus.stats.accumulate import FIELDS, RouterStats
from nexus.stats.reservoir import RawReservoir, raw_path
from nexus.teacher import cache as cache_mod
from nexus.teacher.cache import MANIFEST, TeacherCache
from tiny import nexus_cmd, run_main, save_model_dir, slowed, subprocess_env, write_text_dataset
from tiny import single_thread  # noqa: F401  (autouse: one thread, as the subprocesses)

RNG = random.Random(int(os.environ.get("NEXUS_FAULT_SEED", "0")))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    return save_model_dir(root / "model"), write_text_dataset(root / "data.jsonl", n=48)


def _ok(*args):
    r = run_main(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def kill_at(proc: subprocess.Popen, ready, delay: float, timeout: float = 120) -> bool:
    """SIGKILL `proc` `delay` seconds after `ready()` first holds. True if it died by that kill."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if ready():
            time.sleep(delay)
            break
        time.sleep(0.005)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    return proc.wait() == -signal.SIGKILL


def leftovers(directory: Path, allowed) -> list[str]:
    """Names in `directory` other than `allowed` ones and hidden temporaries (`.NAME.*.tmp`)."""
    return sorted(p.name for p in directory.iterdir()
                  if not allowed(p.name) and not (p.name.startswith(".") and p.name.endswith(".tmp")))


# ------------------------------------------------------------------------------------------- kill -9


def test_collect_killed_at_a_random_point_resumes_to_the_same_statistics(files, tmp_path):
    model, data = files
    args = ["collect", "--model", model, "--dataset", data, "--seq-len", 16, "--batch-size", 2, "--target-tokens", 0,
            "--keep-raw", 20, "--flush-every", 1, "--device", "cpu"]
    ref = tmp_path / "ref.safetensors"
    _ok(*args, "--output", ref)

    out = tmp_path / "run" / "stats.safetensors"
    out.parent.mkdir()
    partial = out.with_name("stats.partial.safetensors")
    # 48 documents in batches of 2, each batch slowed by 0.05 s: more than 1.1 s remain after the first
    # flush, whatever the machine's speed; the kill lands in a forward, a sleep or a flush.
    delay = RNG.uniform(0, 0.9)
    proc = subprocess.Popen(slowed("nexus.stats.collect", 0.05, ["_forward"], *args, "--output", out),
                            env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert kill_at(proc, partial.is_file, delay), f"collect finished before the kill ({delay:.2f} s)"
    if not out.exists():  # (it does only when the kill landed after the final write: then it is complete)
        stats, meta = RouterStats.load(partial)  # the last flush is complete and readable, with its raw sample
        RawReservoir.load(partial.with_name(meta["raw"]))
    assert leftovers(out.parent, lambda n: n.startswith("stats.")) == []

    _ok(*args, "--output", out, "--resume")
    a, b = RouterStats.load(out)[0], RouterStats.load(ref)[0]
    assert a.tokens == b.tokens and all(torch.equal(a.sums[i][f], b.sums[i][f]) for i in a.moe_layers for f in FIELDS)
    ra, rb = RawReservoir.load(raw_path(out)), RawReservoir.load(raw_path(ref))
    assert all(torch.equal(ra.keys[i], rb.keys[i]) and torch.equal(ra.probs[i], rb.probs[i]) for i in ra.moe_layers)
    assert leftovers(out.parent, lambda n: n in ("stats.safetensors", "stats.raw.safetensors")) == []


@pytest.fixture(scope="module")
def pca(files, tmp_path_factory):
    root = tmp_path_factory.mktemp("pca")
    _ok("collect", "--model", files[0], "--dataset", files[1], "--output", root / "s.safetensors", "--seq-len", 16,
        "--target-tokens", 0, "--device", "cpu")
    _ok("analyze", "--input", root / "s.safetensors", "--output", root / "pca.json", "--no-plots", "--top-k", 3)
    return root / "pca.json"


def test_convert_killed_at_a_random_point_leaves_no_adapter_and_reruns_identically(files, pca, tmp_path):
    args = ["convert", "--input", files[0], "--pca-stats", pca, "--init-strategy", "aligned_top3"]
    _ok(*args, "--output", tmp_path / "ref")
    work = tmp_path / "work"
    work.mkdir()
    out = work / "adapter"
    delay = RNG.uniform(0, 0.7)  # more than 1.2 s remain once the bar is up: two layers, then the check
    proc = subprocess.Popen(slowed("nexus.convert.core", 0.4, ["build_layer", "sanity_forward"], *args, "--output", out),
                            env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen = ""
    while "convert:" not in seen:  # waits for the progress bar: the output's temporary exists, layers are next
        char = proc.stderr.read(1)
        assert char, f"convert ended before its progress bar: {seen[-2000:]}"
        seen += char
    assert kill_at(proc, lambda: True, delay), f"convert finished before the kill ({delay:.2f} s)"
    assert not out.exists() and leftovers(work, lambda n: False) == []

    _ok(*args, "--output", out)  # no --overwrite needed: nothing was left under the name
    assert [p.name for p in work.iterdir()] == ["adapter"]  # the killed run's temporary was cleared away
    for name in ("nexus_adapter.safetensors", "nexus_config.json"):
        assert (out / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name


# -------------------------------------------------------------------------------------- a full disk


class DiskFull:
    """A writer that fails with ENOSPC on its `fail_at`-th call (1-based), after writing half a file."""

    def __init__(self, write, fail_at: int):
        self.write, self.fail_at, self.calls = write, fail_at, 0

    def __call__(self, tensors, filename, *args, **kwargs):
        self.calls += 1
        if self.calls == self.fail_at:
            Path(filename).write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))
        return self.write(tensors, filename, *args, **kwargs)


def test_full_disk_during_a_checkpoint_keeps_the_previous_one_and_resumes(files, tmp_path, monkeypatch):
    model, data = files
    args = ["train", "--student-model", model, "--init-strategy", "random", "--dataset", data, "--seq-len", 32,
            "--batch-size", 2, "--max-steps", 4, "--learning-rate", 3e-3, "--checkpoint-interval", 1, "--device", "cpu"]
    _ok(*args, "--output-dir", tmp_path / "ref")
    out = tmp_path / "run"
    monkeypatch.setattr(adapter_mod, "save_file", DiskFull(adapter_mod.save_file, fail_at=2))  # checkpoint-2
    r = run_main(*args, "--output-dir", out)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"{out / 'checkpoint-2'}: cannot write (No space left on device" in r.stderr, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1", "metrics.jsonl", "run_config.json"]
    nexus.load_model(out / "checkpoint-1")  # the previous checkpoint is intact

    monkeypatch.undo()
    _ok(*args, "--output-dir", out, "--resume-from-checkpoint", "latest")
    a = load_file(str(out / "final" / "nexus_adapter.safetensors"))
    b = load_file(str(tmp_path / "ref" / "final" / "nexus_adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_full_disk_during_a_shard_write_keeps_the_complete_shards(files, tmp_path, monkeypatch):
    model, data = files
    args = ["precompute-teacher", "--model", model, "--dataset", data, "--output", tmp_path / "c", "--seq-len", 16,
            "--num-sequences", 20, "--shard-size", 4, "--top-k", 4, "--device", "cpu"]
    monkeypatch.setattr(cache_mod, "save_file", DiskFull(cache_mod.save_file, fail_at=3))
    r = run_main(*args)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"{tmp_path / 'c' / 'shard-00002.safetensors'}: cannot write (No space left on device" in r.stderr
    written = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "c").glob("shard-*")}
    assert sorted(written) == ["shard-00000.safetensors", "shard-00001.safetensors"]
    assert not (tmp_path / "c" / MANIFEST).exists() and sorted(cache_mod.completed_shards(tmp_path / "c")) == [0, 1]

    monkeypatch.undo()
    r = _ok(*args)
    assert "2 already written" in r.stdout
    assert all((tmp_path / "c" / n).stat().st_mtime_ns == t for n, t in written.items())  # kept, not redone
    cache = TeacherCache(tmp_path / "c")
    assert len(cache) == 20 and cache.read(range(20))["topk_logprobs"].shape == (20, 16, 4)  # checksums verified


def _limit_file_size(limit: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # writes beyond: EFBIG (Python ignores SIGXFSZ)
    return apply


def test_file_size_limit_during_convert_is_a_clear_error(files, pca, tmp_path):
    """A real failed write (RLIMIT_FSIZE in a subprocess), through the whole CLI."""
    out = tmp_path / "work" / "adapter"
    out.parent.mkdir()
    r = subprocess.run(nexus_cmd("convert", "--input", files[0], "--pca-stats", pca, "--init-strategy", "pca_top3",
                                 "--output", out), env=dict(subprocess_env(), PYTHONDONTWRITEBYTECODE="1"),
                       capture_output=True, text=True, timeout=120, preexec_fn=_limit_file_size(4096))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1].startswith(f"error: {out}: cannot write (File too large")
    assert list(out.parent.iterdir()) == []  # no adapter, no temporary


@pytest.mark.parametrize("how", ["ENOSPC", "EDQUOT", "safetensors"])
def test_a_failed_atomic_write_keeps_what_was_there(tmp_path, how):
    from safetensors import SafetensorError

    error = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)") \
        if how == "safetensors" else OSError(getattr(errno, how), os.strerror(getattr(errno, how)))
    target = tmp_path / "stats.safetensors"
    target.write_bytes(b"previous")
    with pytest.raises(NexusError, match=r"stats\.safetensors: cannot write .*nothing was written under this name"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise error
    folder = tmp_path / "checkpoint-3"
    folder.mkdir()
    (folder / "kept").write_text("previous")
    with pytest.raises(NexusError, match=r"checkpoint-3: cannot write"):
        with atomic_dir(folder, overwrite=True) as tmp:
            (tmp / "half").write_bytes(b"half")
            raise error
    assert target.read_bytes() == b"previous" and [p.name for p in folder.iterdir()] == ["kept"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3", "stats.safetensors"]  # no temporaries


# ------------------------------------------------------------------------------------- a rank dying


def _worker_pids(launcher: int) -> dict[int, int]:
    """{RANK: pid} of the worker processes a torchrun launcher started."""
    out = {}
    try:
        children = Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()
    except OSError:
        return out
    for pid in map(int, children):
        try:
            env = dict(kv.split("=", 1) for kv in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in kv)
        except OSError:
            continue
        if "RANK" in env:
            out[int(env["RANK"])] = pid
    return out


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds torchrun's workers through /proc")
@pytest.mark.parametrize("mode", ["replicated", "sharded"])
def test_a_rank_killed_under_torchrun_stops_the_job_which_then_resumes(files, tmp_path, mode):
    model, data = files
    args = ["train", "--student-model", model, "--init-strategy", "random", "--dataset", data, "--seq-len", 32,
            "--batch-size", 1, "--max-steps", 24, "--learning-rate", 3e-3, "--checkpoint-interval", 2,
            "--device", "cpu", "--output-dir", tmp_path / "ddp", *(["--shard-base"] if mode == "sharded" else [])]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    env = dict(subprocess_env(), NEXUS_DIST_TIMEOUT="30")
    proc = subprocess.Popen([*torchrun, *nexus_cmd(*args)[1:]], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    start = time.time()
    while time.time() - start < 120 and proc.poll() is None and not (tmp_path / "ddp" / "checkpoint-4").is_dir():
        time.sleep(0.01)
    victim = _worker_pids(proc.pid).get(1)
    assert victim is not None and proc.poll() is None, "the run ended before rank 1 could be killed"
    os.kill(victim, signal.SIGKILL)
    killed = time.time()
    _, err = proc.communicate(timeout=90)  # stops on its own: no hang
    assert proc.returncode != 0 and time.time() - killed < 60
    assert "Signal 9 (SIGKILL)" in err and "rank      : 1" in err, err[-3000:]
    assert not (tmp_path / "ddp" / "final").exists()
    done = sorted(int(p.name.split("-")[1]) for p in (tmp_path / "ddp").glob("checkpoint-*"))
    assert done and all(json.loads((tmp_path / "ddp" / f"checkpoint-{n}" / "trainer_state.json").read_text())["step"]
                        == n for n in done)

    r = subprocess.run([*torchrun, *nexus_cmd(*args, "--resume-from-checkpoint", "latest")[1:]], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {tmp_path / 'ddp' / f'checkpoint-{done[-1]}'}" in r.stderr
    # 2 ranks x accumulation 1 = 1 process x accumulation 2 (tests/test_train_distributed.py)
    one = [a if a != tmp_path / "ddp" else tmp_path / "one" for a in args if a != "--shard-base"]
    _ok(*one, "--gradient-accumulation-steps", 2)
    a = load_file(str(tmp_path / "ddp" / "final" / "nexus_adapter.safetensors"))
    b = load_file(str(tmp_path / "one" / "final" / "nexus_adapter.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_a_lost_peer_is_a_one_line_error(monkeypatch):
    """What a rank says when a collective fails because another rank died (gloo's own words)."""
    from nexus.cli import describe_error

    gloo = RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:30865")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    message, code = describe_error(gloo)
    assert code == 1 and message.startswith("rank 1: lost contact with the other processes of this job (")
    assert "--resume-from-checkpoint latest" in message
    assert describe_error(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None  # a bug: traceback
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert describe_error(gloo) is None


# ------------------------------------------------------------------------------------------ NaN/Inf


def test_nan_router_logits_stop_collect_naming_the_layer_before_anything_is_written(files, tmp_path):
    model_dir, data = files
    broken = tmp_path / "broken"
    model = nexus.load_model(model_dir)
    with torch.no_grad():
        model.model.layers[1].mlp.gate.weight[0, 0] = float("nan")
    model.save_pretrained(broken)
    for f in model_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            (broken / f.name).write_bytes(f.read_bytes())
    out = tmp_path / "stats.safetensors"
    r = run_main("collect", "--model", broken, "--dataset", data, "--output", out, "--seq-len", 16, "--target-tokens",
                 0, "--flush-every", 1, "--device", "cpu")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "error: layer 1: router statistics (prob_sum) are NaN or infinite after batch 1" in r.stderr, r.stderr
    assert list(tmp_path.glob("stats*")) == []


def test_non_finite_validation_metrics_write_no_report(files, tmp_path):
    """A base whose logits overflow: validate names the dataset and metric, and writes no report."""
    model_dir, data = files
    inf_base = tmp_path / "inf-base"
    model = nexus.load_model(model_dir)
    with torch.no_grad():
        model.lm_head.weight[5, 0] = float("inf")
    model.save_pretrained(inf_base)
    for f in model_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            (inf_base / f.name).write_bytes(f.read_bytes())
    adapter = nexus.attach_shared_experts(nexus.load_model(inf_base), init="random")
    nexus.save_adapter(adapter, tmp_path / "adapter")
    out = tmp_path / "report"
    r = run_main("validate", "--model", tmp_path / "adapter", "--dataset", f"domain={data}", "--compute-perplexity",
                 "--num-samples", 2, "--seq-len", 16, "--device", "cpu", "--output", out)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "error: --dataset domain: " in r.stderr and "came out NaN or infinite" in r.stderr, r.stderr[-2000:]
    assert not out.exists()
