"""`nexus precompute-teacher` and offline distillation (`nexus train --precomputed-teacher`)."""

import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import nexus
from nexus.cli import main
from nexus.errors import NexusError
from nexus.teacher import precompute as pre
from nexus.teacher.cache import MANIFEST, TeacherCache, bytes_per_token, completed_shards
from nexus.train.config import TrainConfig
from nexus.train.metrics import read_metrics
from nexus.train.recipe import Trainer
from nexus.stream import DataSpec, SequenceStream, build_sequences
from tiny import make_tokenizer, nexus_cmd, save_model_dir, subprocess_env, write_text_dataset
from tiny import single_thread  # noqa: F401  (autouse: one thread per test process)

SEQ = 32


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher")
    return save_model_dir(root / "model"), write_text_dataset(root / "data.jsonl", n=24)


@pytest.fixture(scope="module")
def cache(files, tmp_path_factory):
    """k = V = 96, router top-R = all 8 experts; 40 sequences in shards of 16 (the last one partial)."""
    out = tmp_path_factory.mktemp("cache") / "c"
    pre.precompute(pre.PrecomputeConfig(model=str(files[0]), dataset=str(files[1]), output=str(out), num_steps=10,
                                        batch_size=4, seq_len=SEQ, top_k=96, router_topk=8, shard_size=16,
                                        device="cpu"))
    return out


def _train_cfg(files, out, **kw):
    cfg = dict(student_model=str(files[0]), dataset=str(files[1]), output_dir=str(out), seq_len=SEQ, batch_size=2,
               gradient_accumulation_steps=2, max_steps=10, learning_rate=3e-3, init_strategy="random",
               checkpoint_interval=4, device="cpu")
    cfg.update(kw)
    return TrainConfig(**cfg)


def test_cache_layout_manifest_and_same_stream_as_training(files, cache):
    m = json.loads((cache / MANIFEST).read_text())
    assert m["format"] == "nexus-teacher-cache" and m["num_sequences"] == 40 and m["top_k"] == 96
    assert m["bytes_per_token"] == bytes_per_token(96, 2, 8) == 96 * 6 + 5 + 2 * 8 * 4
    assert [s["sequences"] for s in m["shards"]] == [16, 16, 8] and all(len(s["sha256"]) == 64 for s in m["shards"])
    shard = load_file(str(cache / "shard-00000.safetensors"))
    assert {k: (v.dtype, tuple(v.shape)) for k, v in shard.items()} == {
        "input_ids": (torch.int32, (16, SEQ)), "attention_mask": (torch.uint8, (16, SEQ)),
        "topk_logprobs": (torch.float16, (16, SEQ, 96)), "topk_indices": (torch.int32, (16, SEQ, 96)),
        "router_topk_logprobs": (torch.float16, (16, SEQ, 2, 8)), "router_topk_indices": (torch.int16, (16, SEQ, 2, 8))}
    # Row p is stream position p of the training pipeline (same tokenizer, packing, seed).
    tok = make_tokenizer()
    stream = SequenceStream(build_sequences(DataSpec(str(files[1]), seq_len=SEQ), tok), seed=0)
    c = TeacherCache(cache)
    for positions in (range(0, 4), range(14, 19), range(36, 40)):  # inside a shard, across shards, the end
        ids, mask = stream.batch(positions)
        rows = c.read(positions)
        assert torch.equal(rows["input_ids"], ids) and torch.equal(rows["attention_mask"], mask)
    probs = rows["topk_logprobs"].float().exp().sum(-1)  # k = V: each row is a whole distribution
    torch.testing.assert_close(probs, torch.ones_like(probs), rtol=0, atol=2e-2)


def test_offline_kl_with_k_equal_vocab_matches_online(files, cache, tmp_path):
    rows = {}
    for name, kw in (("online", {}), ("offline", {"precomputed_teacher": str(cache)})):
        t = Trainer(_train_cfg(files, tmp_path / name, router_kl_weight=0.5, **kw))
        t.setup()
        try:
            rows[name] = t._optimizer_step(0)
        finally:
            t.cleanup()
    on, off = rows["online"], rows["offline"]
    assert on["ce"] == off["ce"]  # the same tokens
    assert off["kl"] == pytest.approx(on["kl"], rel=5e-2, abs=1e-6)  # fp16 log-probs
    assert off["router_kl"] == pytest.approx(on["router_kl"], rel=5e-2, abs=1e-5)
    assert off["router_l1"] == pytest.approx(on["router_l1"], rel=5e-2, abs=1e-4)


def test_offline_training_learns_and_resumes_exactly(files, cache, tmp_path):
    full = Trainer(_train_cfg(files, tmp_path / "full", precomputed_teacher=str(cache)))
    full.setup()
    full.train()
    full.cleanup()
    rows = read_metrics(tmp_path / "full" / "metrics.jsonl")
    assert sum(r["loss"] for r in rows[-3:]) < sum(r["loss"] for r in rows[:3]) - 0.05
    assert rows[0]["teacher_router_entropy"] is None and rows[0]["router_l1"] is not None

    part = tmp_path / "part"
    shutil.copytree(tmp_path / "full" / "checkpoint-4", part / "checkpoint-4")
    resumed = Trainer(_train_cfg(files, part, precomputed_teacher=str(cache), resume_from_checkpoint="latest"))
    resumed.setup()
    assert resumed.step == 4
    resumed.train()
    resumed.cleanup()
    again = read_metrics(part / "metrics.jsonl")
    assert [r["loss"] for r in again] == [r["loss"] for r in rows[4:]]
    a = load_file(str(tmp_path / "full" / "final" / "nexus_adapter.safetensors"))
    b = load_file(str(part / "final" / "nexus_adapter.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_mismatched_caches_are_refused(files, cache, tmp_path):
    with pytest.raises(NexusError, match="--seq-len 32, this run uses --seq-len 48"):
        Trainer(_train_cfg(files, tmp_path / "a", seq_len=48, precomputed_teacher=str(cache))).setup()

    other = tmp_path / "other-tokenizer"
    shutil.copytree(files[0], other)
    make_tokenizer(90).save_pretrained(other)  # a different vocabulary for the same model
    with pytest.raises(NexusError, match="different tokenizer"):
        Trainer(_train_cfg(files, tmp_path / "b", student_model=str(other), precomputed_teacher=str(cache))).setup()

    changed = write_text_dataset(tmp_path / "changed.jsonl", n=24, seed=5)
    t = Trainer(_train_cfg(files, tmp_path / "c", dataset=str(changed), precomputed_teacher=str(cache)))
    try:
        t.setup()
        with pytest.raises(NexusError, match="cached input ids .* differ"):
            t._optimizer_step(0)
    finally:
        t.cleanup()

    t = Trainer(_train_cfg(files, tmp_path / "e", dataset=None, precomputed_teacher=str(cache)))
    try:
        t.setup()  # without --dataset: the dataset the cache records, checked like any other
        assert t.spec.dataset == str(files[1].resolve())
        t._optimizer_step(0)
    finally:
        t.cleanup()

    with pytest.raises(NexusError, match="holds 40 sequences; --max-steps 11"):
        Trainer(_train_cfg(files, tmp_path / "d", max_steps=11, precomputed_teacher=str(cache))).setup()


def test_precompute_prints_storage_and_refuses_without_disk_room(files, tmp_path, monkeypatch, capsys):
    class Full:
        free = 1000

    monkeypatch.setattr(pre.shutil, "disk_usage", lambda path: Full)
    with pytest.raises(SystemExit) as e:
        main(["precompute-teacher", "--model", str(files[0]), "--dataset", str(files[1]), "--seq-len", str(SEQ),
              "--num-sequences", "8", "--top-k", "16", "--output", str(tmp_path / "c"), "--device", "cpu"])
    captured = capsys.readouterr()
    assert e.value.code == 2 and "101 bytes/token (top-k 16: k × 6 + 5)" in captured.out
    assert "the disk has 1000 B free" in captured.err and not list((tmp_path / "c").glob("shard-*"))


def test_precompute_killed_midway_continues_from_the_last_complete_shard(files, tmp_path, capsys):
    args = ["precompute-teacher", "--model", files[0], "--dataset", files[1], "--seq-len", SEQ, "--num-sequences",
            1200, "--batch-size", 20, "--shard-size", 20, "--top-k", 8, "--device", "cpu", "--output", tmp_path / "c"]
    env = subprocess_env()
    proc = subprocess.Popen(nexus_cmd(*args), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if len(list((tmp_path / "c").glob(".shard-*.json"))) >= 3:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    assert proc.wait() == -signal.SIGKILL, "precompute finished before it could be killed"
    assert not (tmp_path / "c" / MANIFEST).exists()
    # A shard renamed into place whose sidecar the kill prevented is incomplete: it is written again.
    written = {e["file"]: (tmp_path / "c" / e["file"]).stat().st_mtime_ns
               for e in completed_shards(tmp_path / "c").values()}
    assert len(written) >= 3

    out = subprocess.run(nexus_cmd(*args), env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert f"{len(written)} already written" in out.stdout
    for name, mtime in written.items():  # complete shards were kept, not recomputed
        assert (tmp_path / "c" / name).stat().st_mtime_ns == mtime
    c = TeacherCache(tmp_path / "c")
    assert len(c) == 1200 and len(c.manifest["shards"]) == 60
    stream = SequenceStream(build_sequences(DataSpec(str(files[1]), seq_len=SEQ), make_tokenizer()), seed=0)
    ref = pre.teacher_topk(nexus.load_model(files[0]).eval(), *stream.batch(range(1180, 1200)), k=8, chunk=64)
    rows = c.read(range(1180, 1200))
    assert torch.equal(rows["topk_indices"], ref["topk_indices"])
    torch.testing.assert_close(rows["topk_logprobs"], ref["topk_logprobs"], rtol=0, atol=2e-3)

    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    assert e.value.code == 0 and "already complete" in capsys.readouterr().out


@pytest.mark.slow
def test_precompute_under_torchrun_writes_disjoint_shards(files, tmp_path):
    args = nexus_cmd("precompute-teacher", "--model", files[0], "--dataset", files[1], "--seq-len", SEQ,
                     "--num-sequences", 50, "--shard-size", 10, "--top-k", 8, "--device", "cpu",
                     "--output", tmp_path / "ddp")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          *args[1:]], env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    single = tmp_path / "one"
    pre.precompute(pre.PrecomputeConfig(model=str(files[0]), dataset=str(files[1]), output=str(single),
                                        num_sequences=50, seq_len=SEQ, top_k=8, shard_size=10, device="cpu"))
    a, b = TeacherCache(tmp_path / "ddp"), TeacherCache(single)
    assert len(a.manifest["shards"]) == 5
    ra, rb = a.read(range(50)), b.read(range(50))
    assert torch.equal(ra["input_ids"], rb["input_ids"]) and torch.equal(ra["topk_indices"], rb["topk_indices"])
