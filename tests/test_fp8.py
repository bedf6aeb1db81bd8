"""Block FP8: the codec is bit-for-bit transformers' own; miniature DeepSeek-V3 / Qwen3-FP8 checkpoints
in both layouts load in transformers to what `nexus.base.fp8.decode` makes of the stored bytes."""

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from quant_checkpoints import (FP8_BLOCK, fp8_scaled_tensors, load_dequantized_reference, load_fp8_quantized,
                               write_fp8_checkpoint, write_mxfp4_gpt_oss)
from safetensors import safe_open
from transformers.integrations.finegrained_fp8 import (FP8Experts, Fp8Dequantize, Fp8Quantize,
                                                      _dequantize_fp8_weight)

from nexus.base import fp8, native
from nexus.convert.fp8_writer import FP8_QUANTIZATION_CONFIG, fp8_tensors

_INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16}


def random_fp8(shape, block, seed=0):
    """Every finite e4m3 code, and scales over many magnitudes: weight [..., out, in], scale_inv on the ceil grid."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
    codes[(codes & 0x7F) == 0x7F] = 0  # 0x7F / 0xFF are NaN in e4m3fn
    scale = torch.exp2(torch.randint(-20, 4, fp8.grid(shape, block), generator=g).float())
    scale = scale * (1 + torch.rand(scale.shape, generator=g))  # not powers of two
    return codes.view(fp8.FP8_DTYPE), scale


def bits(t):
    return t.view(_INT_VIEW[t.dtype])


@pytest.fixture(params=["native", "torch"])
def decode_path(request, monkeypatch):
    """Each CPU decode path: the compiled kernel, and torch's ops (no C compiler)."""
    if request.param == "native" and native.library() is None:
        pytest.skip("no C compiler: the native decode kernels are not built here")
    if request.param == "torch":
        monkeypatch.setitem(native._STATE, "lib", None)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_code_and_a_partial_tile_into_a_buffer(decode_path, dtype):
    codes = torch.arange(256, dtype=torch.uint8).repeat(3, 1)  # NaN (0x7F, 0xFF) and subnormals too
    w = torch.cat([codes, codes.flip(1)[:, :40]], dim=1).view(fp8.FP8_DTYPE)  # 296 columns: a partial 3rd tile
    s = torch.tensor([[0.37, 1e-30, 2.0**120]], dtype=torch.float32)  # a tiny and a huge scale: sub/overflow
    buf = torch.empty(3 * 296, dtype=dtype)
    ours = fp8.decode(w, s, (128, 128), dtype, out=buf)
    assert ours.data_ptr() == buf.data_ptr() and ours.shape == (3, 296)
    want = (w.float() * s.repeat_interleave(128, dim=1)[:, :296]).to(dtype)  # torch's own conversion and product
    assert torch.equal(ours.isnan(), want.isnan()) and ours.isnan().sum() == 3 * 3  # 0x7F, 0xFF, 0xFF again
    assert torch.equal(bits(ours.nan_to_num(0.0)), bits(want.nan_to_num(0.0)))
    with pytest.raises(ValueError, match="out= must be a contiguous"):
        fp8.decode(w, s, (128, 128), dtype, out=torch.empty(5, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block", [(128, 128), (16, 32)])
def test_decode_equals_transformers_load_dequantizer_bit_for_bit(decode_path, dtype, block):
    shape = (3, 256, 256) if block == (128, 128) else (3, 48, 96)
    w, s = random_fp8(shape, block)
    ref = Fp8Dequantize(None)._dequantize_one(w, s, output_dtype=dtype)  # what from_pretrained(dequantize=True) runs
    ours = fp8.decode(w, s, block, dtype)
    assert ours.shape == shape and ours.dtype == dtype
    assert torch.equal(bits(ours), bits(ref))
    if dtype == torch.float32:  # transformers' FP8 backward dequantizer: the same bits in fp32
        assert torch.equal(bits(ours), bits(_dequantize_fp8_weight(w, s, list(block), dtype)))


def test_partial_blocks_use_the_ceil_grid(decode_path):
    """DeepSeek-V3's kv_a_proj_with_mqa is 576 x 7168: 4.5 row tiles of 128, scale grid [5, 56]."""
    w, s = random_fp8((576, 256), (128, 128), seed=1)
    assert s.shape == (5, 2)
    ours = fp8.decode(w, s)
    assert torch.equal(bits(ours), bits(_dequantize_fp8_weight(w, s, [128, 128], torch.float32)))
    assert torch.equal(ours[512:], w[512:].float() * s[4:5].repeat_interleave(128, dim=1))  # the half tile
    # transformers' load-time dequantizer infers the tile as shape // grid: 576 % 5 != 0 -> refuses ...
    with pytest.raises(ValueError, match=r"not divisible by scale grid \(5, 2\)"):
        Fp8Dequantize(None)._dequantize_one(w, s, output_dtype=torch.float32)
    # ... and where it divides (24 rows on a grid of 2 tiles of 16) it silently uses 12-row tiles
    w, s = random_fp8((24, 32), (16, 16), seed=2)
    wrong = Fp8Dequantize(None)._dequantize_one(w, s, output_dtype=torch.float32)
    assert torch.equal(wrong[:12], fp8.decode(w, s, (16, 16))[:12])
    assert not torch.equal(wrong[12:16], fp8.decode(w, s, (16, 16))[12:16])


def test_decode_rejects_wrong_grid_or_dtypes():
    w, s = random_fp8((32, 32), (16, 16))
    with pytest.raises(ValueError, match=r"needs scales \(2, 2\), got \(2, 1\)"):
        fp8.decode(w, s[:, :1], (16, 16))
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        fp8.decode(w.float(), s, (16, 16))


@pytest.mark.parametrize("shape,block", [((2, 64, 96), (16, 32)), ((256, 128), (128, 128))])
def test_encode_equals_transformers_quantizer_bit_for_bit(shape, block):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(shape, generator=g) * torch.logspace(-4, 2, shape[-2]).unsqueeze(-1)
    w[..., : block[0], : block[1]] = 0  # an all-zero tile: scale_inv 1
    config = SimpleNamespace(weight_block_size=list(block), scale_fmt="float")
    ref = Fp8Quantize(SimpleNamespace(quantization_config=config))._quantize_one("x.weight", w)
    q, s = fp8.encode(w, block)
    assert q.dtype == fp8.FP8_DTYPE and s.dtype == torch.float32 and s.shape == fp8.grid(shape, block)
    assert torch.equal(q.view(torch.uint8), ref["x.weight"].view(torch.uint8))
    assert torch.equal(s, ref["x.weight_scale_inv"])
    assert (s[..., 0, 0] == 1).all()


def test_encode_decode_round_trip_within_e4m3_precision():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(3, 40, 56, generator=g) * torch.logspace(-3, 1, 40).unsqueeze(-1)  # partial tiles both ways
    q, s = fp8.encode(w, (16, 16))
    assert s.shape == (3, 3, 4)
    back = fp8.decode(q, s, (16, 16))
    step = s.repeat_interleave(16, -2).repeat_interleave(16, -1)[..., :40, :56]  # the tile's scale_inv
    # e4m3: 3 mantissa bits (relative half-step 2^-4), subnormal step 2^-9, in units of scale_inv
    assert ((w - back).abs() <= torch.maximum(w.abs() * 2**-4, step * 2**-10) * 1.0001).all()
    codes = torch.nn.functional.pad(q.float().abs(), (0, 8, 0, 8)).reshape(3, 3, 16, 4, 16)
    assert (codes.amax(dim=(-3, -1)) == fp8.FP8_MAX).all()  # each tile's largest value maps to 448, partial ones too


# --- miniature checkpoints in the released layouts --------------------------------------------------

CASES = [(f, layout) for f in ("qwen3_moe", "deepseek_v3") for layout in ("per_expert", "fused")]


@pytest.fixture(scope="module")
def fp8_dirs(tmp_path_factory):
    made = {}

    def get(family, layout):
        if (family, layout) not in made:
            d = tmp_path_factory.mktemp(f"{family}-fp8-{layout}")
            made[family, layout] = (d, write_fp8_checkpoint(family, d, layout))
        return made[family, layout]
    return get


def stored(directory):
    directory = Path(directory)
    index = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
    out = {}
    for shard in sorted(set(index.values())):
        with safe_open(str(directory / shard), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def decoded_experts(tensors, layer_prefix, num_experts, block):
    """gate_up [E, 2I, H] and down [E, H, I] from the stored bytes, by nexus.base.fp8.decode alone."""
    def dq(key):
        scale = key + "_scale_inv" if not key.endswith(".weight") else key[: -len("weight")] + "weight_scale_inv"
        return fp8.decode(tensors[key], tensors[scale], block)

    p = f"{layer_prefix}.mlp.experts"
    if f"{p}.gate_up_proj" in tensors:
        return dq(f"{p}.gate_up_proj"), dq(f"{p}.down_proj")
    gate_up = torch.stack([torch.cat([dq(f"{p}.{j}.gate_proj.weight"), dq(f"{p}.{j}.up_proj.weight")])
                           for j in range(num_experts)])
    down = torch.stack([dq(f"{p}.{j}.down_proj.weight") for j in range(num_experts)])
    return gate_up, down


@pytest.mark.parametrize("family,layout", CASES)
def test_fp8_checkpoint_layout(fp8_dirs, family, layout):
    d, model = fp8_dirs(family, layout)
    tensors = stored(d)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == ["model-00001-of-00002.safetensors",
                                                         "model-00002-of-00002.safetensors"]
    assert (d / "tokenizer.json").is_file()
    quant = json.loads((d / "config.json").read_text())["quantization_config"]
    assert {k: v for k, v in quant.items() if k != "modules_to_not_convert"} == dict(
        FP8_QUANTIZATION_CONFIG, weight_block_size=list(FP8_BLOCK))
    assert ("modules_to_not_convert" in quant) == (family == "qwen3_moe")
    L = len(model.model.layers) - 1  # a MoE layer in both families
    p = f"model.layers.{L}.mlp.experts"
    if layout == "per_expert":
        assert tensors[f"{p}.3.gate_proj.weight"].dtype == fp8.FP8_DTYPE
        assert tensors[f"{p}.3.gate_proj.weight"].shape == (16, 32)  # [I, H]
        assert tensors[f"{p}.3.gate_proj.weight_scale_inv"].shape == (1, 2)  # [ceil(I/16), ceil(H/16)]
        assert tensors[f"{p}.3.down_proj.weight"].shape == (32, 16)
        assert tensors[f"{p}.3.down_proj.weight_scale_inv"].shape == (2, 1)
        assert not any(re.search(r"\.experts\.(gate_up|down)_proj", k) for k in tensors)
    else:
        assert tensors[f"{p}.gate_up_proj"].dtype == fp8.FP8_DTYPE
        assert tensors[f"{p}.gate_up_proj"].shape == (8, 32, 32)  # [E, 2I, H]
        assert tensors[f"{p}.gate_up_proj_scale_inv"].shape == (8, 2, 2)
        assert tensors[f"{p}.down_proj"].shape == (8, 32, 16)  # [E, H, I]
        assert tensors[f"{p}.down_proj_scale_inv"].shape == (8, 2, 1)
        assert not any(re.search(r"\.experts\.\d+\.", k) for k in tensors)
    # every FP8 tensor has its scale on the ceil grid, float32
    scaled = fp8_scaled_tensors(d)
    for weight, (scale, w_shape, s_shape) in scaled.items():
        assert tensors[weight].dtype == fp8.FP8_DTYPE and tensors[scale].dtype == torch.float32
        assert s_shape == fp8.grid(w_shape, FP8_BLOCK), weight
    fp8_weights = {k for k, t in tensors.items() if t.dtype == fp8.FP8_DTYPE}
    assert fp8_weights == set(scaled)
    # unquantized, as released: embeddings, norms, routers, lm_head in bf16; DeepSeek's correction bias in fp32
    plain = {k: t.dtype for k, t in tensors.items() if k not in scaled and not k.endswith("_scale_inv")}
    for key, dtype in plain.items():
        assert re.search(r"embed_tokens|norm|layernorm|mlp\.gate\.|lm_head", key), key
        assert dtype == (torch.float32 if key.endswith("e_score_correction_bias") else torch.bfloat16), key
    assert f"model.layers.{L}.mlp.gate.weight" in plain and "lm_head.weight" in plain
    attention = {"qwen3_moe": ["q_proj", "k_proj", "v_proj", "o_proj"],
                 "deepseek_v3": ["q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]}[family]
    for proj in attention:
        assert f"model.layers.{L}.self_attn.{proj}.weight" in scaled
    if family == "deepseek_v3":
        assert {f"model.layers.0.mlp.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")} <= set(scaled)
        assert f"model.layers.{L}.mlp.shared_experts.down_proj.weight" in scaled
        assert plain[f"model.layers.{L}.mlp.gate.e_score_correction_bias"] == torch.float32
        assert plain[f"model.layers.{L}.self_attn.kv_a_layernorm.weight"] == torch.bfloat16
        assert scaled[f"model.layers.{L}.self_attn.kv_a_proj_with_mqa.weight"][1:] == ((24, 32), (2, 2))  # partial


@pytest.mark.parametrize("family,layout", CASES)
def test_transformers_loads_what_decode_reads(fp8_dirs, family, layout):
    """Expert weights of transformers' dequantized model == nexus decode of the stored bytes; logits near the
    fp32 original (FP8 keeps 3 mantissa bits, other weights are bf16: relative logit error observed ~2%)."""
    d, model = fp8_dirs(family, layout)
    ref = load_dequantized_reference(d)
    tensors = stored(d)
    for L, layer in enumerate(ref.model.layers):
        experts = layer.mlp.experts if hasattr(layer.mlp, "experts") else None
        if experts is None:
            continue
        gate_up, down = decoded_experts(tensors, f"model.layers.{L}", experts.num_experts, FP8_BLOCK)
        assert torch.equal(experts.gate_up_proj, gate_up), L
        assert torch.equal(experts.down_proj, down), L
    for name, (scale, _, _) in fp8_scaled_tensors(d).items():  # the other FP8 Linears too
        if name.endswith(".weight") and ".experts." not in name:
            assert torch.equal(ref.get_parameter(name), fp8.decode(tensors[name], tensors[scale], FP8_BLOCK)), name
    ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = ref(ids).logits, model(ids).logits
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < 0.04, rel
    assert (got - want).abs().max() < 0.1 * want.abs().max()


def test_both_layouts_hold_the_same_weights(fp8_dirs):
    d1, _ = fp8_dirs("qwen3_moe", "per_expert")
    d2, _ = fp8_dirs("qwen3_moe", "fused")
    a, b = stored(d1), stored(d2)
    ga, da = decoded_experts(a, "model.layers.1", 8, FP8_BLOCK)
    gb, db = decoded_experts(b, "model.layers.1", 8, FP8_BLOCK)
    assert torch.equal(ga, gb) and torch.equal(da, db)


def test_transformers_dequantized_load_on_per_expert_checkpoint(fp8_dirs):
    """transformers' own CPU path (dequantize=True) is the reference where all tiles are whole; its GPU-path
    load (FP8 params) dequantized with its `_dequantize_fp8_weight` gives the same model."""
    d, _ = fp8_dirs("qwen3_moe", "per_expert")
    official = load_dequantized_reference(d, path="dequantize")
    via_fp8 = load_dequantized_reference(d, path="quantized")
    for (name, p), (_, q) in zip(official.named_parameters(), via_fp8.named_parameters()):
        assert torch.equal(p, q), name
    quantized = load_fp8_quantized(d)
    experts = quantized.model.layers[1].mlp.experts
    assert isinstance(experts, FP8Experts)
    assert experts.gate_up_proj.dtype == fp8.FP8_DTYPE and experts.gate_up_proj_scale_inv.shape == (8, 2, 2)


def test_transformers_dequantized_load_limits(fp8_dirs):
    """Where transformers' dequantize=True load is wrong, and why the reference takes the FP8 load there:
    fused experts' `<param>_scale_inv` are dropped (the raw e4m3 values are loaded unscaled); DeepSeek's
    kv_a_proj_with_mqa (a partial tile) is dequantized with the wrong tile height."""
    d, _ = fp8_dirs("qwen3_moe", "fused")
    tensors = stored(d)
    official = load_dequantized_reference(d, path="dequantize")
    assert torch.equal(official.model.layers[1].mlp.experts.gate_up_proj,
                       tensors["model.layers.1.mlp.experts.gate_up_proj"].float())
    d, _ = fp8_dirs("deepseek_v3", "per_expert")
    tensors = stored(d)
    official = load_dequantized_reference(d, path="dequantize")
    key = "model.layers.2.self_attn.kv_a_proj_with_mqa.weight"
    right = fp8.decode(tensors[key], tensors[key + "_scale_inv"], FP8_BLOCK)
    assert not torch.equal(official.get_parameter(key), right)
    assert torch.equal(official.get_parameter(key), Fp8Dequantize(None)._dequantize_one(
        tensors[key], tensors[key + "_scale_inv"], output_dtype=torch.float32))
    assert torch.equal(load_dequantized_reference(d).get_parameter(key), right)


def test_fused_layout_needs_whole_expert_blocks():
    from conftest import tiny_model

    model = tiny_model("qwen3_moe", moe_intermediate_size=12)
    with pytest.raises(ValueError, match="whole"):
        list(fp8_tensors(model, "fused", (16, 16)))
    with pytest.raises(ValueError, match="transposed or biased"):
        list(fp8_tensors(tiny_model("gpt_oss"), "fused", (8, 8)))


def test_mxfp4_helper_and_reference(tmp_path):
    model = write_mxfp4_gpt_oss(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    ref = load_dequantized_reference(tmp_path)
    experts = ref.model.layers[1].mlp.experts
    assert experts.down_proj.dtype == torch.float32
    assert experts.down_proj.shape == model.model.layers[1].mlp.experts.down_proj.shape
