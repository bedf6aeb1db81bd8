"""`nexus plan --devices N --device-memory GB` on the real configs of four models (meta models only):
per-rank memory replicated and sharded, checked against arithmetic done here, the verdicts, and the
flag errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nexus.base.quantized import CHUNK_BYTES

DATA = Path(__file__).resolve().parent / "data"
GIB = 1024**3
_cache: dict = {}


def run_cli(capsys, *args):
    """Run `nexus ARGS` in this process; returns (exit code, stdout, stderr)."""
    from nexus.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def plan_json(capsys, model: str, *flags) -> dict:
    key = (model, *flags)
    if key not in _cache:
        code, out, err = run_cli(capsys, "plan", "--model", DATA / model, "--json", *flags)
        assert code == 0, err
        _cache[key] = json.loads(out)
    return _cache[key]


# The largest decoder layer's bytes as the checkpoint stores it, from the published shapes.
def gpt_oss_layer(experts: int) -> float:
    h, heads, kv, d = 2880, 64, 8, 64
    attention = h * heads * d + heads * d + 2 * (h * kv * d + kv * d) + heads * d * h + h + heads  # + sinks
    router = h * experts + experts
    expert_weights = experts * (h * 2 * h + h * h)  # gate_up [H, 2I] and down [I, H], I = H
    expert_biases = experts * (2 * h + h)
    return (attention + router + expert_biases + 2 * h) * 2 + expert_weights * 17 / 32


def qwen3_30b_layer() -> float:
    h, heads, kv, d, experts, i = 2048, 32, 4, 128, 128, 768
    attention = h * heads * d + 2 * h * kv * d + heads * d * h + 2 * d  # q, k, v, o, q_norm, k_norm
    return (attention + experts * h + experts * 3 * h * i + 2 * h) * 2


def deepseek_v3_layer() -> float:
    h, heads, q_rank, kv_rank, nope, rope, v, experts, i = 7168, 128, 1536, 512, 128, 64, 128, 256, 2048
    attention = (h * q_rank + q_rank + q_rank * heads * (nope + rope) + h * (kv_rank + rope) + kv_rank
                 + kv_rank * heads * (nope + v) + heads * v * h)
    routed = experts * 3 * h * i  # FP8: one byte per weight, an fp32 scale per 128x128 block
    return (attention + experts * h + 3 * h * i + 2 * h) * 2 + routed * (1 + 4 / 128**2)  # + gate, shared, norms


def root(vocab: int, h: int) -> int:
    """The root unit, gathered for the whole step when sharded: input embeddings, LM head, final norm (bf16)."""
    return (2 * vocab * h + h) * 2


ROOT = {"gpt-oss-20b": root(201088, 2880), "gpt-oss-120b": root(201088, 2880), "qwen3-30b-a3b": root(151936, 2048),
        "deepseek-v3": root(129280, 7168)}
LARGEST_LAYER = {"gpt-oss-20b": gpt_oss_layer(32), "gpt-oss-120b": gpt_oss_layer(128),
                 "qwen3-30b-a3b": qwen3_30b_layer(), "deepseek-v3": deepseek_v3_layer()}

# model, devices, GiB per device, expected verdict for train/base (collect ...) with the native and dequantized base
CASES = [
    ("gpt-oss-20b", 2, 16, {"train/native": "sharded", "base/native": "replicated",
                            "train/dequantized": "does not fit", "base/dequantized": "does not fit"}),
    ("gpt-oss-120b", 1, 141, {"train/native": "replicated", "base/native": "replicated",
                              "train/dequantized": "does not fit", "base/dequantized": "does not fit"}),
    ("gpt-oss-120b", 8, 48, {"train/native": "sharded", "base/native": "sharded",
                             "train/dequantized": "sharded", "base/dequantized": "sharded"}),
    ("qwen3-30b-a3b", 2, 48, {"train/native": "sharded", "base/native": "sharded"}),
    ("qwen3-30b-a3b", 4, 80, {"train/native": "replicated", "base/native": "replicated"}),
    ("deepseek-v3", 1, 141, {"train/native": "does not fit", "base/native": "does not fit",
                             "train/dequantized": "does not fit", "base/dequantized": "does not fit"}),
    ("deepseek-v3", 8, 141, {"train/native": "sharded", "base/native": "sharded",
                             "train/dequantized": "does not fit", "base/dequantized": "does not fit"}),
]


@pytest.mark.parametrize("model, devices, gib, verdicts", CASES, ids=[f"{c[0]}-{c[1]}x{c[2]}" for c in CASES])
def test_plan_per_rank_memory_and_verdicts(capsys, model, devices, gib, verdicts):
    plan = plan_json(capsys, model, "--devices", devices, "--device-memory", gib)
    d, mem = plan["devices"], plan["memory_bytes"]
    assert d["devices"] == devices and d["device_memory_bytes"] == gib * GIB
    assert d["verdicts"] == verdicts
    # the largest layer as stored, against the published shapes; dequantized, bf16 for every weight
    assert abs(d["largest_layer_bytes"]["native"] - LARGEST_LAYER[model]) < 16
    chunk = CHUNK_BYTES if plan["quantization"] else 0
    base = {"native": mem["base_native"] - chunk, "dequantized": mem["base_dequantized"]}
    gathered_trainable = 8 * plan["shared_params_per_layer"]  # fp32 weight + gradient of the layer's shared expert
    rows = {(r["stage"], r["base_form"], r["layout"]): r for r in d["per_rank"]}
    assert len(rows) == 4 * len(d["largest_layer_bytes"])
    for (stage, form, layout), r in rows.items():
        trainable = mem["trainable_optimizer_state"] if stage == "train" else 0
        if layout == "replicated":
            expected = base[form] + trainable + (chunk if form == "native" else 0)
            assert r["gathered_layers_bytes"] == 0
        else:
            layer = d["largest_layer_bytes"][form] + (gathered_trainable if stage == "train" else 0)
            assert abs(r["gathered_layers_bytes"] - 2 * layer - ROOT[model]) <= 2
            assert abs(r["base_bytes"] * devices - base[form]) <= devices
            expected = base[form] / devices + 2 * layer + ROOT[model] + trainable / devices + \
                (chunk if form == "native" else 0)
        assert abs(r["total_bytes"] - expected) <= 4, (stage, form, layout)
        assert r["total_bytes"] == (r["base_bytes"] + r["gathered_layers_bytes"] + r["trainable_bytes"]
                                    + r["decode_chunk_bytes"])
        assert r["fits"] == (expected <= gib * GIB)
    # the replicated train row is the single-process figure the plan has always printed
    assert rows["train", "native", "replicated"]["total_bytes"] == mem["train_native_base"]
    for key, verdict in verdicts.items():  # replicated when it fits, else sharded when that fits
        stage, form = key.split("/")
        fits = [layout for layout in ("replicated", "sharded") if rows[stage, form, layout]["fits"]]
        assert verdict == (fits[0] if fits else "does not fit")


def test_plan_base_sizes_match_the_published_checkpoints(capsys):
    # DeepSeek-V3 is about 690 GB in FP8 (its 671 B parameters, the non-expert ones bf16 once loaded)
    ds = plan_json(capsys, "deepseek-v3", "--devices", 8, "--device-memory", 141)
    assert ds["quantization"] == "fp8" and abs(ds["total_params"] / 1e9 - 671.0) < 0.1
    assert 680e9 < ds["memory_bytes"]["base_native"] < 700e9
    qwen = plan_json(capsys, "qwen3-30b-a3b", "--devices", 2, "--device-memory", 48)
    assert qwen["quantization"] is None and abs(qwen["total_params"] / 1e9 - 30.53) < 0.01
    assert qwen["memory_bytes"]["base_native"] == qwen["total_params"] * 2
    big = plan_json(capsys, "gpt-oss-120b", "--devices", 1, "--device-memory", 141)
    assert abs(big["total_params"] / 1e9 - 116.83) < 0.01 and big["routed_top_k"] == 4
    assert big["devices"]["largest_layer"] == 0  # every gpt-oss layer is the same size


def test_plan_devices_without_memory_gives_no_verdict(capsys):
    plan = plan_json(capsys, "gpt-oss-20b", "--devices", 4)
    d = plan["devices"]
    assert d["devices"] == 4 and d["device_memory_bytes"] is None and d["verdicts"] == {}
    assert all(r["fits"] is None for r in d["per_rank"])
    code, table, _ = run_cli(capsys, "plan", "--model", DATA / "gpt-oss-20b", "--devices", 4)
    assert code == 0 and "memory per rank on 4 devices (" in table
    assert " fits" not in table and "does not fit" not in table


def test_plan_device_memory_alone_means_one_device(capsys):
    d = plan_json(capsys, "gpt-oss-20b", "--device-memory", 24)["devices"]
    assert d["devices"] == 1 and d["verdicts"]["train/native"] == "replicated"
    assert d["verdicts"]["train/dequantized"] == "does not fit"


def test_plan_without_devices_is_unchanged(capsys):
    assert "devices" not in plan_json(capsys, "gpt-oss-20b")
    code, table, _ = run_cli(capsys, "plan", "--model", DATA / "gpt-oss-20b")
    assert code == 0 and "per rank" not in table and "--shard-base" not in table


def test_plan_device_table(capsys):
    code, table, _ = run_cli(capsys, "plan", "--model", DATA / "deepseek-v3", "--devices", 8, "--device-memory", 141)
    assert code == 0
    lines = table.splitlines()
    assert "memory per rank on 8 devices of 141.00 GiB (weights and optimizer state; activations come on top)" in lines
    assert "train: fits sharded only" in lines and "collect, validate, precompute-teacher: fits sharded only" in lines
    assert "train --dequantize: does not fit" in lines
    sharded = lines[lines.index("train: fits sharded only") + 2].split()
    assert sharded[0] == "sharded" and sharded[-1] == "yes"
    base, gathered, trainable, chunk, total = map(float, sharded[1:6])
    assert abs(base + gathered + trainable + chunk - total) < 0.02


@pytest.mark.parametrize("flags, message", [
    (["--devices", "0"], "--devices 0: expected a number of devices >= 1"),
    (["--devices", "-2", "--device-memory", "80"], "--devices -2: expected a number of devices >= 1"),
    (["--device-memory", "0"], "--device-memory 0.0: expected GiB per device > 0"),
    (["--devices", "2", "--device-memory", "-80"], "--device-memory -80.0: expected GiB per device > 0"),
    (["--device-memory", "nan"], "--device-memory nan: expected GiB per device > 0"),
    (["--device-memory", "inf"], "--device-memory inf: expected GiB per device > 0"),
    (["--keep-raw", "-1"], "--keep-raw -1: expected a number of tokens per layer >= 0"),
    (["--keep-hidden"], "--keep-hidden keeps the hidden states of the --keep-raw sample: pass --keep-raw N too"),
])
def test_plan_bad_device_flags(capsys, flags, message):
    code, out, err = run_cli(capsys, "plan", "--model", DATA / "gpt-oss-20b", *flags)
    assert code == 2 and out == "" and err.strip() == f"error: {message}"


def test_plan_devices_must_be_a_whole_number(capsys):
    code, out, err = run_cli(capsys, "plan", "--model", DATA / "gpt-oss-20b", "--devices", "1.5")
    assert code == 2 and out == "" and "--devices" in err and "Traceback" not in err


def test_plan_sizes_collects_raw_sample_on_gpt_oss_120b(capsys):
    """N tokens x 36 layers x (float64 key + 128 float32 probabilities + 2880 bf16 hidden values)."""
    plan = plan_json(capsys, "gpt-oss-120b", "--keep-raw", "4096", "--keep-hidden", "--devices", "8")
    per_layer = 4096 * (8 + 4 * 128 + 2 * 2880)
    assert plan["raw_sample"] == {"tokens_per_layer": 4096, "hidden": True, "hidden_bytes_per_value": 2,
                                  "device_bytes": 36 * per_layer, "flush_gathered_bytes": 8 * per_layer,
                                  "flush_host_bytes": 2 * 36 * per_layer, "disk_bytes": 36 * per_layer}
    probs_only = plan_json(capsys, "gpt-oss-120b", "--keep-raw", "4096")["raw_sample"]
    assert probs_only["disk_bytes"] == 36 * 4096 * (8 + 4 * 128) and probs_only["flush_gathered_bytes"] == \
        4096 * (8 + 4 * 128)  # one device without --devices
    assert "raw_sample" not in plan_json(capsys, "gpt-oss-120b")
    code, out, _ = run_cli(capsys, "plan", "--model", DATA / "gpt-oss-120b", "--keep-raw", "4096", "--keep-hidden")
    assert code == 0 and "collect --keep-raw 4096 --keep-hidden: raw sample of 4,096 tokens per MoE layer" in out


def loaded_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


@pytest.mark.parametrize("dtype", ["auto", "bfloat16", "float32"])
def test_plan_base_bytes_are_what_the_loaders_hold(capsys, tmp_path, dtype):
    """plan --dtype D against the models the loaders build with --dtype D: NEXUS's quantized loader (MXFP4
    and FP8 kept packed; auto = the shards' stored bf16, though these configs name float32), transformers'
    dequantizing load (auto = the config's float32) and an unquantized checkpoint (the demo model)."""
    import torch
    from quant_checkpoints import write_fp8_checkpoint, write_mxfp4_gpt_oss

    from nexus.base.loader import load_base_model
    from nexus.demo_data import DEMO_MODEL_DIR

    write_mxfp4_gpt_oss(tmp_path / "mxfp4")
    write_fp8_checkpoint("qwen3_moe", tmp_path / "fp8")
    load_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    expected_auto = {"mxfp4": ("bfloat16", "float32"), "fp8": ("bfloat16", "float32"), "demo": ("float32", None)}
    for name, path in (("mxfp4", tmp_path / "mxfp4"), ("fp8", tmp_path / "fp8"), ("demo", DEMO_MODEL_DIR)):
        plan = json.loads(run_cli(capsys, "plan", "--model", path, "--dtype", dtype, "--json")[1])
        mem, chunk = plan["memory_bytes"], CHUNK_BYTES if plan["quantization"] else 0
        native = load_base_model(str(path), dtype=load_dtype)
        assert mem["base_native"] - chunk == loaded_bytes(native), name
        assert plan["dtype"] == (expected_auto[name][0] if dtype == "auto" else dtype)
        auto_source = "auto: the config's dtype" if name == "demo" else "auto: as stored in the shards"
        assert plan["dtype_source"] == ("--dtype" if dtype != "auto" else auto_source)
        if plan["quantization"]:
            dequantized = load_base_model(str(path), dtype=load_dtype, dequantize=True)
            assert mem["base_dequantized"] == loaded_bytes(dequantized), name
            assert plan["dequantized_dtype"] == (expected_auto[name][1] if dtype == "auto" else dtype)


def test_plan_dtype_sizes_the_weights_and_hidden_states_it_names(capsys):
    """gpt-oss's config names no dtype and its shards are absent here: auto says it assumes bf16;
    --dtype float32 doubles every non-quantized weight, the dequantized base and the hidden states."""
    auto = plan_json(capsys, "gpt-oss-20b", "--keep-raw", "64", "--keep-hidden")
    fp32 = plan_json(capsys, "gpt-oss-20b", "--keep-raw", "64", "--keep-hidden", "--dtype", "fp32")
    assert (auto["dtype"], auto["dtype_source"]) == ("bfloat16", "auto: assumed, the config names none")
    assert (fp32["dtype"], fp32["dtype_source"], fp32["dequantized_dtype"]) == ("float32", "--dtype", "float32")
    assert fp32["memory_bytes"]["base_dequantized"] == 2 * auto["memory_bytes"]["base_dequantized"]
    packed = 24 * 32 * 3 * 2880 * 2880 * 17 / 32  # the routed experts' MXFP4 weights, unchanged by --dtype
    rest = auto["memory_bytes"]["base_native"] - CHUNK_BYTES - packed
    assert abs(fp32["memory_bytes"]["base_native"] - CHUNK_BYTES - packed - 2 * rest) < 1
    assert (auto["raw_sample"]["hidden_bytes_per_value"], fp32["raw_sample"]["hidden_bytes_per_value"]) == (2, 4)
    code, out, err = run_cli(capsys, "plan", "--model", DATA / "gpt-oss-20b", "--dtype", "int8")
    assert code == 2 and out == "" and "--dtype" in err and "int8" in err and "Traceback" not in err
