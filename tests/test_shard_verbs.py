"""--shard-base in the verbs that only run forwards: collect, validate, precompute-teacher (gloo, 2 ranks).

Each is started without torchrun (`--shard-base --nproc 2` relaunches it) or under torchrun, with work
that does not divide evenly over the ranks (a rank out of work runs discarded forwards), and gives what
one unsharded process gives; `nexus pipeline` carries `shard_base: true` to each stage; the flag is
refused by name with what cannot work with it.
"""

import json
import subprocess
import sys

import pytest
import torch

from nexus.stats import collect as collect_mod
from nexus.stats.accumulate import FIELDS, RouterStats
from nexus.teacher import precompute as pre
from nexus.teacher.cache import TeacherCache
from quant_checkpoints import write_mxfp4_gpt_oss
from tiny import (nexus_cmd, run_main, save_adapter_dir, save_model_dir, subprocess_env, write_datasets,
                  write_text_dataset)
from tiny import single_thread  # noqa: F401  (autouse: one thread per test process)

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def _run(cmd):
    r = subprocess.run([str(c) for c in cmd], env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


def test_sharded_collect_resumes_a_partial_run_and_equals_one_process(tmp_path, monkeypatch):
    """MXFP4 gpt-oss (experts packed, fp32 rest): one process is stopped after 3 batches; the sharded
    2-rank run resumes it (an odd number of batches left: one rank pads) and ends with the statistics of
    an uninterrupted one-process run."""
    model = tmp_path / "model"
    write_mxfp4_gpt_oss(model)
    data = write_text_dataset(tmp_path / "data.jsonl", n=14)
    args = ["--model", model, "--dataset", data, "--seq-len", 16, "--batch-size", 3, "--target-tokens", 0,
            "--dtype", "float32", "--device", "cpu", "--flush-every", 1]
    r = run_main("collect", *args, "--output", tmp_path / "one.safetensors")
    assert r.returncode == 0, r.stderr
    one = RouterStats.load(tmp_path / "one.safetensors")[0]

    forward, calls = collect_mod._forward, {"n": 0}

    def interrupted(*a):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        forward(*a)

    monkeypatch.setattr(collect_mod, "_forward", interrupted)
    out = tmp_path / "sharded.safetensors"
    r = run_main("collect", *args, "--output", out)
    assert r.returncode == 130, r.stderr
    assert RouterStats.load(collect_mod.partial_path(out))[1]["batches_done"] == "3"
    batches = sum(1 for _ in collect_mod.iter_batches(
        (json.loads(line)["text"] for line in data.read_text().splitlines()), _tokenizer(model), 16, 3))
    assert (batches - 3) % 2 == 1, batches  # the last round has one batch: rank 1 runs a forward counting nothing

    r = _run(nexus_cmd("collect", *args, "--output", out, "--resume", "--shard-base", "--nproc", 2))
    assert "launching: " in r.stdout and "--nproc-per-node=2" in r.stdout and "over 2 processes" in r.stdout
    two = RouterStats.load(out)[0]
    assert (two.moe_layers, two.num_experts, two.top_k, two.tokens) == \
        (one.moe_layers, one.num_experts, one.top_k, one.tokens)
    for layer in one.moe_layers:
        for f in FIELDS:
            torch.testing.assert_close(two.sums[layer][f], one.sums[layer][f], rtol=1e-5, atol=1e-7)
    assert not collect_mod.partial_path(out).exists()


def _tokenizer(model):
    from nexus.data import load_tokenizer

    return load_tokenizer(str(model))


@pytest.mark.parametrize("baseline", ["own base", "separate"])
def test_sharded_validate_equals_one_process(tmp_path, baseline):
    """5 sequences in batches of 2 over 2 ranks: rank 1 runs a third batch that counts nothing."""
    base = save_model_dir(tmp_path / "base")
    adapter = save_adapter_dir(base, tmp_path / "adapter", init="random", scale=300.0)
    data = write_datasets(tmp_path / "data")
    args = ["validate", "--model", adapter, "--dataset", f"general={data['general']}", "--dataset",
            f"domain={data['domain']}", "--compute-perplexity", "--num-samples", 5, "--seq-len", 8,
            "--batch-size", 2, "--device", "cpu", "--dtype", "float32"]
    if baseline == "separate":  # loaded (and sharded) as a second model
        args += ["--baseline", save_adapter_dir(base, tmp_path / "other", init="random", scale=100.0, seed=1)]
    r = run_main(*args, "--output", tmp_path / "one")
    assert r.returncode == 0, r.stderr
    if baseline == "own base":
        _run(nexus_cmd(*args, "--output", tmp_path / "two", "--shard-base", "--nproc", 2))
    else:  # under torchrun directly
        _run([*TORCHRUN, *nexus_cmd(*args, "--output", tmp_path / "two", "--shard-base")[1:]])
    one = json.loads((tmp_path / "one" / "report.json").read_text())
    two = json.loads((tmp_path / "two" / "report.json").read_text())
    assert one["datasets"].keys() == two["datasets"].keys() == {"general", "domain"}

    def close(a, b, where):
        if isinstance(a, dict):
            assert a.keys() == b.keys(), where
            for k in a:
                close(a[k], b[k], f"{where}.{k}")
        elif isinstance(a, float):
            assert b == pytest.approx(a, rel=1e-5, abs=1e-8), where
        else:
            assert a == b, where

    close(one["datasets"], two["datasets"], "datasets")
    close(one["layers"], two["layers"], "layers")  # router entropy, agreement, shared output ratio
    assert one["datasets"]["general"]["perplexity"] is not None and one["datasets"]["general"]["kl"] > 0
    assert all(v["shared_output_ratio"] and v["routing_agreement"] is not None for v in one["layers"].values())


def test_sharded_precompute_teacher_equals_one_process(tmp_path):
    """5 shards of 10 sequences, batches of 4: rank 0 writes 3 shards (9 forwards), rank 1 writes 2 (6) and
    pads with 3 forwards; router top-R too."""
    model = save_model_dir(tmp_path / "model")
    data = write_text_dataset(tmp_path / "data.jsonl", n=24)
    common = dict(num_sequences=50, seq_len=16, top_k=8, router_topk=4, shard_size=10, batch_size=4)
    flags = [x for k, v in common.items() for x in (f"--{k.replace('_', '-')}", v)]
    _run(nexus_cmd("precompute-teacher", "--model", model, "--dataset", data, *flags, "--device", "cpu",
                   "--dtype", "float32", "--output", tmp_path / "two", "--shard-base", "--nproc", 2))
    pre.precompute(pre.PrecomputeConfig(model=str(model), dataset=str(data), output=str(tmp_path / "one"),
                                        device="cpu", dtype="float32", **common))
    a, b = TeacherCache(tmp_path / "two"), TeacherCache(tmp_path / "one")
    assert len(a.manifest["shards"]) == 5
    ra, rb = a.read(range(50)), b.read(range(50))
    assert ra.keys() == rb.keys() and "router_topk_logprobs" in ra
    for k in ra:
        if ra[k].dtype.is_floating_point:
            torch.testing.assert_close(ra[k], rb[k], rtol=0, atol=2e-3)
        else:
            assert torch.equal(ra[k], rb[k]), k


def test_pipeline_carries_shard_base_to_each_stage(tmp_path, monkeypatch):
    import yaml

    from nexus.pipeline.runner import load_pipeline_config, run_pipeline

    calls = []
    monkeypatch.setattr(subprocess, "call", lambda cmd, env=None: calls.append(cmd) or 0)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for name in ("model", "adapter"):
        (tmp_path / name).mkdir()
    (tmp_path / "data.jsonl").write_text('{"text": "a b c"}\n')
    sharded = {"shard_base": True, "nproc": 3, "device": "cpu"}
    cfg = {"model": str(tmp_path / "model"), "dataset": str(tmp_path / "data.jsonl"), "work_dir": str(tmp_path / "w"),
           "stages": {"collect": {"dataset": str(tmp_path / "data.jsonl"), **sharded},
                      "precompute-teacher": {"num_sequences": 4, **sharded},
                      "validate": {"model": str(tmp_path / "adapter"), "dataset": [str(tmp_path / "data.jsonl")],
                                   **sharded}}}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(cfg))
    run_pipeline(load_pipeline_config(tmp_path / "p.yaml"), tmp_path)
    assert [c[7] for c in calls] == ["collect", "precompute-teacher", "validate"]
    for cmd in calls:
        assert cmd[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=3", "-m"]
        assert "--shard-base" in cmd and "--nproc" not in cmd and cmd[6] == "nexus"


def test_shard_base_refusals(tmp_path):
    collect = ["collect", "--model", "m", "--dataset", "d", "--output", tmp_path / "o.safetensors"]
    r = run_main(*collect, "--shard-base", "--dequantize")
    assert r.returncode == 2 and "--dequantize with --shard-base is not supported" in r.stderr
    r = run_main(*collect, "--nproc", 2)
    assert r.returncode == 2 and "--nproc is the process count of --shard-base" in r.stderr
    r = run_main("collect", "--merge", "a", "b", "--output", tmp_path / "m.safetensors", "--shard-base")
    assert r.returncode == 2 and "--merge with --shard-base is not supported" in r.stderr
    validate = ["validate", "--model", "m", "--dataset", "d", "--shard-base"]
    r = run_main(*validate, "--chat")
    assert r.returncode == 2 and "--chat (text generation) with --shard-base is not supported" in r.stderr
    r = run_main(*validate, "--device", "auto")
    assert r.returncode == 2 and "--device auto (spread over GPUs) with --shard-base is not supported" in r.stderr
    r = run_main(*validate, "--dequantize")
    assert r.returncode == 2 and "--dequantize with --shard-base is not supported" in r.stderr
    teacher = ["precompute-teacher", "--model", "m", "--dataset", "d", "--output", tmp_path / "c", "--num-sequences", 4]
    r = run_main(*teacher, "--shard-base", "--dequantize")
    assert r.returncode == 2 and "--dequantize with --shard-base is not supported" in r.stderr
    r = run_main(*teacher, "--nproc", 2)
    assert r.returncode == 2 and "--nproc is the process count of --shard-base" in r.stderr
