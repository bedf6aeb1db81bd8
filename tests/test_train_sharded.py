"""--shard-base on CPU (gloo, torchrun, 2 ranks): the frozen base sharded with FSDP2.

- each rank reads only its rows of the checkpoint, and they are the rows of the unsharded load;
  each rank holds about half of the base;
- 2 sharded ranks × accumulation A train the adapter of 1 process × accumulation 2A (MXFP4 gpt-oss
  with an fp32 rest, and a bf16 qwen3_moe with trainable routers kept in fp32 by FSDP2);
- a sharded checkpoint resumes in one process, and a one-process checkpoint under sharding.
(kill -9 of a sharded rank and the resume: tests/test_reliability_faults.py.)
"""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from nexus.base.loader import load_base_model
from nexus.train.metrics import read_metrics
from quant_checkpoints import write_fp8_checkpoint, write_mxfp4_gpt_oss
from tiny import nexus_cmd, run_main, save_model_dir, subprocess_env, write_text_dataset
from tiny import single_thread  # noqa: F401  (autouse: one thread per test process)

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]

# Loads each checkpoint sharded over the ranks and writes each rank's rows of every parameter.
SHARDS = """
import json, sys, torch
from safetensors.torch import save_file
from nexus import dist
from nexus.base.loader import build_on_meta, materialize_sharded
from nexus.sharding import local_nbytes, local_rows, shard_model
dist.init("cpu")
for path in sys.argv[1:]:
    model, plan = build_on_meta(path, dtype=torch.float32)
    shard_model(model, torch.device("cpu"))
    materialize_sharded(model, plan, torch.device("cpu"))
    tensors, rows = {}, {}
    for n, p in model.named_parameters():
        local, a, b = local_rows(p)
        tensors[n], rows[n] = local.contiguous(), [a, b]
    meta = {"rows": json.dumps(rows), "local_nbytes": str(local_nbytes(model))}
    save_file(tensors, f"{path}.rank{dist.rank()}.safetensors", metadata=meta)
dist.shutdown()
"""

BASES = {
    "gpt_oss-mxfp4": write_mxfp4_gpt_oss,
    "deepseek_v3-fp8-per_expert": lambda d: write_fp8_checkpoint("deepseek_v3", d, "per_expert"),
    "qwen3_moe-fp8-fused": lambda d: write_fp8_checkpoint("qwen3_moe", d, "fused"),
    "qwen3_moe": save_model_dir,
}


def test_each_rank_reads_its_rows_of_the_unsharded_load(tmp_path):
    """MXFP4, FP8 per expert and fused, unquantized: one torchrun job loads them all."""
    for name, write in BASES.items():
        write(tmp_path / name)
    (tmp_path / "shards.py").write_text(SHARDS)
    r = subprocess.run([*TORCHRUN, str(tmp_path / "shards.py"), *(str(tmp_path / name) for name in BASES)],
                       env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    for name in BASES:
        reference = dict(load_base_model(str(tmp_path / name), dtype=torch.float32).named_parameters())
        total = sum(p.numel() * p.element_size() for p in reference.values())
        seen = {n: 0 for n in reference}
        for rank in (0, 1):
            with safe_open(str(tmp_path / f"{name}.rank{rank}.safetensors"), "pt") as f:
                rows = json.loads(f.metadata()["rows"])
                held = int(f.metadata()["local_nbytes"])
                assert sorted(f.keys()) == sorted(reference), name
                for param in f.keys():
                    a, b = rows[param]
                    local = f.get_tensor(param)
                    ref = reference[param].detach()
                    assert local.dtype == ref.dtype, (name, param)
                    assert torch.equal(local, ref[a:b] if ref.dim() else ref), (name, param)  # the same bytes
                    seen[param] += b - a
            assert abs(held - total / 2) <= 0.1 * total, (name, rank, held, total)  # about half of the base each
        assert all(seen[n] == (p.shape[0] if p.dim() else 1) for n, p in reference.items()), name  # every row once


def _train_args(student, data, dtype, init=("--init-strategy", "random")):
    # an odd number of held-out sequences: one rank runs a forward with nothing to count (sharded, all ranks must)
    held_out = write_text_dataset(data.parent / "eval.jsonl", n=3, seed=5)
    general = write_text_dataset(data.parent / "general.jsonl", n=5, seed=7)
    return ["train", "--student-model", student, *init, "--dataset", data, "--seq-len", 32,
            "--eval-dataset", held_out, "--eval-every", 2, "--general-eval-dataset", general,
            "--max-general-increase", 1e6, "--replay-dataset", general,
            "--batch-size", 1, "--max-steps", 4, "--learning-rate", 3e-3, "--checkpoint-interval", 2,
            "--no-freeze-router", "--bias-freeze-ratio", 0.5, "--router-kl-weight", 0.1, "--device", "cpu",
            "--dtype", dtype]


@pytest.mark.parametrize("base", ["gpt_oss-mxfp4", "qwen3_moe-bf16"])
def test_two_sharded_ranks_equal_one_process_and_resume_across_rank_counts(tmp_path, base):
    if base == "gpt_oss-mxfp4":
        write_mxfp4_gpt_oss(tmp_path / "model")
        # a converted adapter with a scalar gate (FSDP2 leaves 0-dim parameters whole; their gradients are averaged)
        convert = run_main("convert", "--input", tmp_path / "model", "--output", tmp_path / "adapter", "--init-strategy",
                           "random", "--gate", 0.5, "--skip-check")
        assert convert.returncode == 0, convert.stderr
        student, init = tmp_path / "adapter", ()
        dtype, extra = "float32", []  # the experts stay packed; fp32 rest, so the runs agree to float tolerance
        rtol, atol, router_atol = 1e-4, 1e-6, 1e-6
    else:  # bf16 base; routers trained (fp32 in FSDP2, computed in bf16), checkpointing and SFA on
        save_model_dir(tmp_path / "model")  # stored fp32, loaded as bf16
        student, init = tmp_path / "model", ("--init-strategy", "random")
        dtype, extra = "bfloat16", ["--gradient-checkpointing", "--sfa-interval", 2]
        # bf16 products summed in another order: the fp32 shared experts agree to ~0.2 %, the bf16 routers
        # to 2 units in the last place
        rtol, atol, router_atol = 2e-2, 1e-3, 2 * 2 ** -7 * 2
    data = write_text_dataset(tmp_path / "data.jsonl", n=24)
    args = [*_train_args(student, data, dtype, init), *extra]
    sharded = subprocess.run([*TORCHRUN, *nexus_cmd(*args, "--gradient-accumulation-steps", 2, "--replay-batches", 1,
                                                    "--shard-base", "--output-dir", tmp_path / "sharded")[1:]],
                             env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    assert sharded.stderr.count("saved ") == 2  # checkpoint-2 and final, written once (rank 0)
    one = run_main(*args, "--gradient-accumulation-steps", 4, "--replay-batches", 2, "--output-dir", tmp_path / "one")
    assert one.returncode == 0, one.stderr[-3000:]

    def close(a_dir, b_dir):
        a = load_file(str(a_dir / "nexus_adapter.safetensors"))
        b = load_file(str(b_dir / "nexus_adapter.safetensors"))
        assert a.keys() == b.keys() and any(k.endswith(("gate.weight", "router.weight")) for k in a)
        assert any(k.endswith("nexus_gate") for k in a) == (base == "gpt_oss-mxfp4")
        for k in a:
            assert a[k].dtype == b[k].dtype, k  # the router keeps the base's dtype in the adapter
            router = "nexus_shared_expert" not in k
            torch.testing.assert_close(a[k].float(), b[k].float(), rtol=0 if router else rtol,
                                       atol=router_atol if router else atol)

    close(tmp_path / "sharded" / "final", tmp_path / "one" / "final")
    # best/ (--general-eval-dataset): the same step chosen, the same adapter, gathered whole by the sharded run
    selected = [json.loads((tmp_path / run / "best" / "trainer_state.json").read_text())["selection"]
                for run in ("sharded", "one")]
    assert selected[0]["step"] == selected[1]["step"]
    assert selected[0]["general_base_ce"] == pytest.approx(selected[1]["general_base_ce"],
                                                           rel=1e-5 if dtype == "float32" else 1e-3)
    for run, sel in zip(("sharded", "one"), selected):  # the change: of each run's own general CE and base CE
        evals = [r for r in read_metrics(tmp_path / run / "metrics.jsonl") if "eval_general_ce" in r]
        assert [r["step"] for r in evals] == [0, 2, 4]
        for r in evals:
            assert r["eval_general_change"] == pytest.approx(100 * (r["eval_general_ce"] / sel["general_base_ce"] - 1))
    close(tmp_path / "sharded" / "best", tmp_path / "one" / "best")
    for ra, rb in zip(read_metrics(tmp_path / "sharded" / "metrics.jsonl"), read_metrics(tmp_path / "one" / "metrics.jsonl"),
                      strict=True):
        for key in ("loss", "eval_ce", "eval_kl", "eval_general_ce", "replay_kl"):
            assert (ra.get(key) is None) == (rb.get(key) is None), key
            if ra.get(key) is not None:
                # bf16: a KL of ~3e-5 nats differs by ~1e-7 between summation orders, so an absolute floor
                assert ra[key] == pytest.approx(rb[key], rel=1e-5 if dtype == "float32" else 1e-3,
                                                abs=1e-7 if dtype == "float32" else 1e-6), key
    ckpt = tmp_path / "sharded" / "checkpoint-2"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["router"]["frozen"] is True
    assert sorted(p.name for p in ckpt.iterdir()) == sorted(p.name for p in (tmp_path / "one" / "checkpoint-2").iterdir())
    optimizer = torch.load(ckpt / "optimizer.pt", weights_only=True)  # whole tensors, as one process writes them
    reference = torch.load(tmp_path / "one" / "checkpoint-2" / "optimizer.pt", weights_only=True)
    for i, s in reference["state"].items():
        assert optimizer["state"][i]["exp_avg"].shape == s["exp_avg"].shape

    # The sharded checkpoint resumed by one process, and the one-process checkpoint resumed sharded.
    for src, dst, launch in ((tmp_path / "sharded", tmp_path / "resumed-one", None),
                             (tmp_path / "one", tmp_path / "resumed-sharded", TORCHRUN)):
        dst.mkdir()
        shutil.copytree(src / "checkpoint-2", dst / "checkpoint-2")
        shutil.copy(src / "run_config.json", dst)
        resume = [*args, "--output-dir", dst, "--resume-from-checkpoint", "latest"]
        command = nexus_cmd(*resume, "--gradient-accumulation-steps", 4, "--replay-batches", 2) if launch is None else \
            [*launch, *nexus_cmd(*resume, "--gradient-accumulation-steps", 2, "--replay-batches", 1,
                                 "--shard-base")[1:]]
        r = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "resumed from" in r.stderr
        close(dst / "final", tmp_path / "one" / "final")


def test_shard_base_refusals(tmp_path):
    base = ["train", "--student-model", "m", "--dataset", "d", "--output-dir", tmp_path / "o", "--init-strategy",
            "random"]
    r = run_main(*base, "--shard-base", "--use-ddp")
    assert r.returncode != 0 and "--use-ddp replicates the base, --shard-base shards it" in r.stderr
    r = run_main(*base, "--shard-base", "--teacher-model", "t")
    assert r.returncode != 0 and "--teacher-model with --shard-base is not supported" in r.stderr
    r = run_main(*base, "--shard-base", "--dequantize")
    assert r.returncode != 0 and "--dequantize with --shard-base is not supported" in r.stderr


def test_shard_model_refuses_tied_embeddings_and_a_single_process():
    from nexus.errors import NexusError
    from nexus.sharding import shard_model
    from tiny import tiny_model

    with pytest.raises(NexusError, match="tied input and output embeddings are not supported with --shard-base"):
        shard_model(tiny_model("qwen3_moe", tie_word_embeddings=True), torch.device("cpu"))
    with pytest.raises(NexusError, match="--shard-base runs under torchrun"):
        shard_model(tiny_model("qwen3_moe"), torch.device("cpu"))
