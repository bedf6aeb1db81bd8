"""`nexus collect`: statistics equal transformers' own router logits; merge, resume and torchrun are exact."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest
import torch
from conftest import FAMILIES, tiny_model
from tiny import random_text, run_main, save_model_dir, subprocess_env, write_jsonl

from nexus.data import pad_batch
from nexus.errors import NexusError
from nexus.moe import find_moe_blocks
from nexus.routing import router_hooks
from nexus.stats import collect as collect_mod
from nexus.stats.accumulate import FIELDS, Collector, RouterStats
from nexus.stats.reservoir import RawReservoir, raw_path


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_router_logits_are_the_raw_router_outputs(family):
    """The reference below relies on `output_router_logits=True` returning the routers' raw logits;
    the collector, fed by the same hooks, counts every token of every MoE layer of every family."""
    model = tiny_model(family)
    seen = {}
    stats = RouterStats.for_model(model)
    collector = Collector(stats)

    def hook(layer, logits, weights, indices):
        seen[layer] = logits.detach()
        collector(layer, logits, weights, indices)

    ids = torch.randint(4, 90, (2, 5))
    collector.set_batch(torch.ones_like(ids))
    with router_hooks(model, hook) as blocks, torch.no_grad():
        out = model(input_ids=ids, output_router_logits=True)
    assert len(out.router_logits) == len(blocks) and stats.moe_layers == [b.layer for b in blocks]
    for logits, block in zip(out.router_logits, blocks):
        assert logits.shape == (10, block.layout.num_experts) and torch.equal(logits, seen[block.layer])
        s = stats.sums[block.layer]
        assert s["count"].item() == 10 and s["topk_count"].sum().item() == 10 * stats.top_k == 20
        torch.testing.assert_close(s["prob_sum"], torch.softmax(logits.double(), -1).sum(0))


def reference_moments(model, seqs: list[list[int]]) -> dict[int, dict[str, torch.Tensor]]:
    """Mean, covariance, entropy and token count per MoE layer from transformers' router_logits output,
    one unpadded sequence at a time (so no padding can be involved)."""
    per_layer: dict[int, list[torch.Tensor]] = {}
    layers = [b.layer for b in find_moe_blocks(model)]
    with torch.no_grad():
        for s in seqs:
            out = model(input_ids=torch.tensor([s]), output_router_logits=True)
            for layer, logits in zip(layers, out.router_logits):
                per_layer.setdefault(layer, []).append(torch.softmax(logits.double(), -1))
    ref = {}
    for layer, chunks in per_layer.items():
        p = torch.cat(chunks)  # (T, E)
        mean = p.mean(0)
        ref[layer] = {"count": p.shape[0], "mean": mean, "cov": (p - mean).T @ (p - mean) / p.shape[0],
                      "entropy": -(p * p.log()).sum(-1).mean()}
    return ref


def moments(stats: RouterStats, layer: int) -> dict:
    s = stats.sums[layer]
    n = s["count"].item()
    mean = s["prob_sum"] / n
    return {"count": n, "mean": mean, "cov": s["prob_outer"] / n - torch.outer(mean, mean),
            "entropy": s["entropy_sum"][0] / n}


def assert_same_moments(stats: RouterStats, ref: dict) -> None:
    assert stats.moe_layers == sorted(ref)
    for layer in stats.moe_layers:
        got, want = moments(stats, layer), ref[layer]
        assert got["count"] == want["count"]
        torch.testing.assert_close(got["mean"], want["mean"], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(got["cov"], want["cov"], rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(got["entropy"], want["entropy"], rtol=1e-5, atol=1e-7)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("data") / "docs.jsonl"
    return write_jsonl(path, [{"text": random_text(rng, 1, 30)} for _ in range(24)])


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {f: save_model_dir(root / f, f) for f in ("gpt_oss", "qwen3_moe", "deepseek_v3")}


def collect(model_dir, data, out, *extra):
    r = run_main("collect", "--model", model_dir, "--dataset", data, "--output", out, "--seq-len", 16,
                 "--batch-size", 3, "--target-tokens", 0, *extra)
    assert r.returncode == 0, r.stderr
    return RouterStats.load(out)[0]


@pytest.mark.parametrize("family", ["gpt_oss", "qwen3_moe", "deepseek_v3"])
def test_collect_equals_statistics_of_transformers_router_logits(family, models, dataset, tmp_path):
    from transformers import AutoModelForCausalLM

    from nexus.data import load_documents, load_tokenizer

    stats = collect(models[family], dataset, tmp_path / "rs.safetensors")
    tok = load_tokenizer(models[family])
    # Documents + EOS in pieces of 16 tokens; a piece would hold only the EOS of a 16-word document: none.
    docs = [tok(d.text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for d in load_documents(dataset)]
    seqs = [ids[i:i + 16] for ids in docs for i in range(0, len(ids), 16) if ids[i:] != [tok.eos_token_id]]
    model = AutoModelForCausalLM.from_pretrained(models[family]).eval()
    assert_same_moments(stats, reference_moments(model, seqs))
    assert stats.tokens == sum(map(len, seqs)) and stats.model_type == family and stats.top_k == 2
    for layer in stats.moe_layers:
        s = stats.sums[layer]
        assert s["topk_count"].sum().item() == 2 * stats.tokens
        assert (s["gate_sum"] >= 0).all() and s["gate_sum"].sum() > 0


@pytest.mark.parametrize("family", ["gpt_oss", "deepseek_v3"])
def test_plan_sizes_the_raw_sample_collect_writes(family, models, dataset, tmp_path):
    """`nexus plan --keep-raw N --keep-hidden` gives the bytes of the file collect writes (less its header)
    and of the sample it holds."""
    import struct

    from nexus.base.config import load_model_config
    from nexus.plan.core import make_plan

    collect(models[family], dataset, tmp_path / "rs.safetensors", "--keep-raw", 40, "--keep-hidden")
    path = raw_path(tmp_path / "rs.safetensors")
    with open(path, "rb") as f:
        header = 8 + struct.unpack("<Q", f.read(8))[0]
    raw = RawReservoir.load(path)
    assert all(torch.isfinite(raw.keys[i]).all() for i in raw.moe_layers)  # the sample is full: N of each layer
    held = sum(t.nbytes for d in (raw.keys, raw.probs, raw.hidden) for t in d.values())
    plan = make_plan(load_model_config(models[family], "--model", False), keep_raw=40, keep_hidden=True).raw_sample
    assert plan["disk_bytes"] == path.stat().st_size - header == held == plan["device_bytes"]


def test_flush_merges_the_sample_in_host_memory_as_a_copy(monkeypatch):
    """A flush's merged sample (what rank 0 writes) is built in host memory, whatever the running sample's
    device (no second copy of the sample on a GPU), and owns its tensors: offers after the flush do not
    change what was merged."""
    asked = []
    empty_like = RawReservoir.empty_like
    monkeypatch.setattr(RawReservoir, "empty_like", lambda self, device=None: asked.append(device) or
                        empty_like(self, device))
    stats = RouterStats([0, 1], num_experts=4, top_k=2)
    res = RawReservoir([0, 1], 4, size=3, seed=1, hidden_size=5, hidden_dtype=torch.bfloat16)
    for b in range(2):
        for layer in (0, 1):
            res.offer(layer, torch.rand(4, 4), b, torch.randn(4, 5))
    _, merged = collect_mod._reduced(stats, res)
    assert asked == ["cpu"]  # the merge target is made in host memory, not on the running sample's device
    for layer in (0, 1):
        assert merged.keys[layer].device.type == "cpu" and merged.hidden[layer].dtype == torch.bfloat16
        assert torch.equal(merged.keys[layer], res.keys[layer]) and torch.equal(merged.hidden[layer], res.hidden[layer])
    before = merged.hidden[0].clone()
    res.offer(0, torch.rand(50, 4), 7, torch.randn(50, 5))  # 50 more tokens: some displace kept ones
    assert not torch.equal(res.keys[0], merged.keys[0]) and torch.equal(merged.hidden[0], before)


@pytest.mark.parametrize("family", ["gpt_oss", "deepseek_v3"])
def test_keep_hidden_keeps_what_the_experts_read_beside_the_same_tokens_probabilities(family, models, dataset, tmp_path):
    """Every kept (probabilities, hidden state) pair is one token's: transformers' router_logits and the
    input of the experts module, for the same token, from an unpadded forward of each sequence."""
    from transformers import AutoModelForCausalLM

    from nexus.data import load_documents, load_tokenizer

    collect(models[family], dataset, tmp_path / "rs.safetensors", "--keep-raw", 40, "--keep-hidden")
    raw = RawReservoir.load(raw_path(tmp_path / "rs.safetensors"))
    tok = load_tokenizer(models[family])
    docs = [tok(d.text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for d in load_documents(dataset)]
    seqs = [ids[i:i + 16] for ids in docs for i in range(0, len(ids), 16) if ids[i:] != [tok.eos_token_id]]
    model = AutoModelForCausalLM.from_pretrained(models[family]).eval()
    blocks = find_moe_blocks(model)
    seen = {b.layer: [] for b in blocks}

    def record(module, args, kwargs, layer):
        x = args[0] if args else kwargs["hidden_states"]
        seen[layer].append(x.reshape(-1, x.shape[-1]))

    hooks = [b.experts.register_forward_pre_hook(lambda m, a, k, layer=b.layer: record(m, a, k, layer),
                                                 with_kwargs=True) for b in blocks]
    probs = {b.layer: [] for b in blocks}
    with torch.no_grad():
        for seq in seqs:
            out = model(input_ids=torch.tensor([seq]), output_router_logits=True)
            for b, logits in zip(blocks, out.router_logits):
                probs[b.layer].append(torch.softmax(logits.float(), -1))
    for h in hooks:
        h.remove()
    assert raw.hidden_size == model.config.hidden_size
    for b in blocks:
        ref_h, ref_p = torch.cat(seen[b.layer]), torch.cat(probs[b.layer])  # (T, H), (T, E)
        kept_h, kept_p = raw.filled_hidden(b.layer), raw.filled(b.layer)
        assert kept_h.shape == (40, model.config.hidden_size) and kept_h.dtype == torch.float32
        token = torch.cdist(kept_h, ref_h).argmin(1)  # the reference token each kept row is
        assert len(set(token.tolist())) > 30  # different tokens (two tokens at a sequence start can be equal)
        torch.testing.assert_close(kept_h, ref_h[token], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(kept_p, ref_p[token], rtol=1e-4, atol=1e-6)


def test_padding_does_not_change_statistics():
    model = tiny_model("gpt_oss")
    seqs = [[5, 9, 13, 40, 41], [7, 8], [60, 61, 62]]
    results = []
    for pad_to in (None, 12):
        stats = RouterStats.for_model(model)
        collector = Collector(stats)
        ids, mask = pad_batch(seqs, pad_id=0, seq_len=pad_to)
        with router_hooks(model, collector), torch.no_grad():
            collector.set_batch(mask)
            model(input_ids=ids, attention_mask=mask)
        results.append(stats)
    assert results[0].tokens == results[1].tokens == 10
    for layer in results[0].moe_layers:
        for f in FIELDS:
            torch.testing.assert_close(results[0].sums[layer][f], results[1].sums[layer][f], rtol=1e-5, atol=1e-6)


def assert_same_stats(a: RouterStats, b: RouterStats, exact: bool = False) -> None:
    assert (a.moe_layers, a.num_experts, a.top_k, a.model_type, a.tokens) == \
        (b.moe_layers, b.num_experts, b.top_k, b.model_type, b.tokens)
    for layer in a.moe_layers:
        for f in FIELDS:
            if exact:
                assert torch.equal(a.sums[layer][f], b.sums[layer][f]), (layer, f)
            else:
                torch.testing.assert_close(a.sums[layer][f], b.sums[layer][f], rtol=1e-6, atol=1e-9)


def test_merge_of_two_halves_equals_one_run(models, dataset, tmp_path):
    lines = dataset.read_text().splitlines(keepends=True)
    (tmp_path / "a.jsonl").write_text("".join(lines[:10]))
    (tmp_path / "b.jsonl").write_text("".join(lines[10:]))
    full = collect(models["gpt_oss"], dataset, tmp_path / "full.safetensors", "--keep-raw", 40)
    collect(models["gpt_oss"], tmp_path / "a.jsonl", tmp_path / "a.safetensors", "--keep-raw", 40, "--keep-hidden")
    collect(models["gpt_oss"], tmp_path / "b.jsonl", tmp_path / "b.safetensors", "--keep-raw", 40, "--seed", 1,
            "--keep-hidden")
    r = run_main("collect", "--merge", tmp_path / "a.safetensors", tmp_path / "b.safetensors",
                 "--output", tmp_path / "ab.safetensors")
    assert r.returncode == 0, r.stderr
    merged, meta = RouterStats.load(tmp_path / "ab.safetensors")
    assert_same_stats(merged, full)
    assert meta["source_model"] == str(models["gpt_oss"])
    raw = RawReservoir.load(raw_path(tmp_path / "ab.safetensors"))
    a, b = (RawReservoir.load(raw_path(tmp_path / f"{x}.safetensors")) for x in "ab")
    for layer in raw.moe_layers:
        p = raw.filled(layer)
        assert p.shape == (40, 8)
        torch.testing.assert_close(p.sum(-1), torch.ones(40), rtol=0, atol=1e-5)
        # the 40 smallest keys of both samples, each row with its own probabilities and hidden state
        keys = torch.cat([a.keys[layer], b.keys[layer]])
        rows = {float(k): (pa, h) for k, pa, h in zip(keys, torch.cat([a.probs[layer], b.probs[layer]]),
                                                        torch.cat([a.hidden[layer], b.hidden[layer]]))}
        assert raw.keys[layer].tolist() == sorted(keys.tolist())[:40]
        for k, pa, h in zip(raw.keys[layer].tolist(), p, raw.filled_hidden(layer)):
            assert torch.equal(rows[k][0], pa) and torch.equal(rows[k][1], h)


def test_interrupted_and_resumed_equals_uninterrupted(models, dataset, tmp_path, monkeypatch):
    args = ("--flush-every", 2, "--keep-raw", 30, "--keep-hidden")
    full = collect(models["qwen3_moe"], dataset, tmp_path / "full.safetensors", *args)
    out = tmp_path / "rs.safetensors"
    calls = {"n": 0}
    forward = collect_mod._forward

    def interrupted(*a):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        forward(*a)

    monkeypatch.setattr(collect_mod, "_forward", interrupted)
    r = run_main("collect", "--model", models["qwen3_moe"], "--dataset", dataset, "--output", out,
                 "--seq-len", 16, "--batch-size", 3, "--target-tokens", 0, *args)
    assert r.returncode == 130 and not out.exists()
    partial, meta = RouterStats.load(collect_mod.partial_path(out))
    assert meta["batches_done"] == "4" and 0 < partial.tokens < full.tokens
    monkeypatch.setattr(collect_mod, "_forward", forward)
    # Other settings than the partial run's are refused, naming what changed.
    r = run_main("collect", "--model", models["qwen3_moe"], "--dataset", dataset, "--output", out,
                 "--seq-len", 8, "--batch-size", 3, "--target-tokens", 0, "--resume", *args)
    assert r.returncode == 2 and "seq_len: 16 then, 8 now" in r.stderr
    r = run_main("collect", "--model", models["qwen3_moe"], "--dataset", dataset, "--output", out,
                 "--seq-len", 16, "--batch-size", 3, "--target-tokens", 0, "--resume", *args[:-1])
    assert r.returncode == 2 and "keep_hidden: True then, None now" in r.stderr
    resumed = collect(models["qwen3_moe"], dataset, out, "--resume", *args)
    assert_same_stats(resumed, full, exact=True)
    assert not collect_mod.partial_path(out).exists() and not raw_path(collect_mod.partial_path(out)).exists()
    a, b = RawReservoir.load(raw_path(out)), RawReservoir.load(raw_path(tmp_path / "full.safetensors"))
    assert all(torch.equal(a.keys[i], b.keys[i]) and torch.equal(a.probs[i], b.probs[i]) and
               torch.equal(a.hidden[i], b.hidden[i]) for i in a.moe_layers)


def test_torchrun_two_processes_equal_one(models, dataset, tmp_path):
    single = collect(models["gpt_oss"], dataset, tmp_path / "one.safetensors", "--keep-raw", 25, "--keep-hidden")
    env = subprocess_env()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "nexus", "collect", "--model", str(models["gpt_oss"]), "--dataset", str(dataset),
           "--output", str(tmp_path / "two.safetensors"), "--seq-len", "16", "--batch-size", "3",
           "--target-tokens", "0", "--keep-raw", "25", "--keep-hidden", "--flush-every", "1", "--device", "cpu"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "over 2 processes" in r.stdout
    two = RouterStats.load(tmp_path / "two.safetensors")[0]
    assert_same_stats(two, single)
    a, b = (RawReservoir.load(raw_path(tmp_path / name)) for name in ("one.safetensors", "two.safetensors"))
    for i in a.moe_layers:
        assert torch.equal(a.keys[i], b.keys[i])
        torch.testing.assert_close(a.probs[i], b.probs[i], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.hidden[i], b.hidden[i], rtol=1e-5, atol=1e-6)
    assert not collect_mod.partial_path(tmp_path / "two.safetensors").exists()


def test_target_tokens_and_batches():
    class Tok:
        eos_token_id = 1

        def __call__(self, texts, add_special_tokens=False):  # the batch call
            return {"input_ids": [[int(w) for w in text.split()] for text in texts]}

    batches = list(collect_mod.iter_batches(["5 6 7 8 9", "10 11", "12 13 14"], Tok(), seq_len=4, batch_size=2,
                                            target_tokens=9))
    assert batches == [[[5, 6, 7, 8], [9, 1]], [[10, 11, 1]]]
    exact = list(collect_mod.iter_batches(["5 6 7 8", "9"], Tok(), seq_len=4, batch_size=8))
    assert exact == [[[5, 6, 7, 8], [9, 1]]]  # no piece holding only the EOS of a full-length document


def _outputs(tmp_path):
    return sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".safetensors")


@pytest.mark.parametrize("case", ["empty", "missing_field", "expert_mismatch", "corrupted", "merge_mismatch",
                                  "hidden_without_raw"])
def test_collect_bad_inputs(case, models, dataset, tmp_path):
    out = tmp_path / "out.safetensors"
    data, extra = dataset, []
    if case == "empty":
        data = tmp_path / "empty.jsonl"
        data.write_text("\n\n")
    elif case == "missing_field":
        extra = ["--text-field", "body"]
    elif case == "hidden_without_raw":
        extra = ["--keep-hidden"]
    elif case == "expert_mismatch":  # a partial run of a model with another expert count
        RouterStats([0, 1], 4, 2, "gpt_oss").save(collect_mod.partial_path(out), {"batches_done": 1, "plan": "{}"})
        extra = ["--resume"]
    before = _outputs(tmp_path)
    if case == "corrupted":
        (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
        before = _outputs(tmp_path)
        r = run_main("collect", "--merge", tmp_path / "bad.safetensors", "--output", out)
        expected = "not a readable safetensors file"
    elif case == "merge_mismatch":
        RouterStats([0, 1], 8, 2, "gpt_oss").save(tmp_path / "a.safetensors")
        RouterStats([0, 1], 4, 2, "gpt_oss").save(tmp_path / "b.safetensors")
        before = _outputs(tmp_path)
        r = run_main("collect", "--merge", tmp_path / "a.safetensors", tmp_path / "b.safetensors", "--output", out)
        expected = "num_experts differs (8 vs 4)"
    else:
        r = run_main("collect", "--model", models["gpt_oss"], "--dataset", data, "--output", out, "--seq-len", 16,
                     *extra)
        expected = {"empty": "no non-empty documents", "missing_field": "has no field 'body'",
                    "expert_mismatch": "num_experts differs (8 vs 4)",
                    "hidden_without_raw": "pass --keep-raw N too"}[case]
    assert r.returncode == 2 and expected in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not out.exists() and _outputs(tmp_path) == before


def test_routed_top_k_is_read_from_the_config_or_refused():
    from types import SimpleNamespace

    from nexus.routing import routed_top_k

    assert routed_top_k(tiny_model("gpt_oss").config) == 2
    assert routed_top_k(SimpleNamespace(model_type="aria_text", moe_topk=6)) == 6
    assert routed_top_k(SimpleNamespace(model_type="gemma4_text", top_k_experts=8)) == 8
    with pytest.raises(NexusError, match="model type 'mystery': its config names no number of experts routed"):
        routed_top_k(SimpleNamespace(model_type="mystery", top_k=50))  # a sampling top_k is not a routing one


def test_collector_refuses_a_router_that_selects_another_top_k():
    stats = RouterStats([0], num_experts=4, top_k=2)
    collector = Collector(stats)
    collector.set_batch(torch.ones(1, 3))
    logits = torch.randn(3, 4)
    weights, indices = logits.softmax(-1).topk(3)
    with pytest.raises(NexusError, match="layer 0: the router selects 3 experts per token, the model config says 2"):
        collector(0, logits, weights, indices)
