"""MXFP4 codec: bit-for-bit equal to transformers' dequantizer; encode -> decode within MXFP4 precision."""

import pytest
import torch
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from nexus.base import mxfp4, native

_INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16}


@pytest.fixture(params=["native", "numpy", "embedding"])
def decode_path(request, monkeypatch):
    """Each CPU decode path: the compiled kernel, numpy's table lookup (no compiler), torch's embedding
    lookups (the path other devices take)."""
    if request.param == "native":
        if native.library() is None:
            pytest.skip("no C compiler: the native MXFP4 kernel is not built here")
    else:
        monkeypatch.setitem(native._STATE, "lib", None)
    if request.param == "embedding":
        monkeypatch.setattr(mxfp4, "_CPU_VIEWS", {})
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_byte_at_every_scale_equals_transformers(decode_path, dtype):
    blocks = torch.arange(256, dtype=torch.uint8).view(1, 16, 1, 16).expand(256, 16, 1, 16).contiguous()
    scales = torch.arange(256, dtype=torch.uint8).view(256, 1, 1).expand(256, 16, 1).contiguous()  # scale s in row s
    ref = convert_moe_packed_tensors(blocks, scales, dtype=dtype)  # [E, in, out]
    ours = mxfp4.decode(blocks, scales, dtype=dtype).transpose(1, 2)
    assert torch.equal(ours.contiguous().view(_INT_VIEW[dtype]), ref.view(_INT_VIEW[dtype]))


def test_decode_into_a_buffer(decode_path):
    g = torch.Generator().manual_seed(3)
    blocks = torch.randint(0, 256, (2, 8, 3, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(100, 140, (2, 8, 3), dtype=torch.uint8, generator=g)
    buf = torch.full((2 * 8 * 96,), float("nan"))
    got = mxfp4.decode(blocks, scales, out=buf)
    assert got.data_ptr() == buf.data_ptr() and got.shape == (2, 8, 96)
    assert torch.equal(got, mxfp4.decode(blocks, scales))
    with pytest.raises(ValueError, match="out= must be a contiguous torch.float32 tensor of 1536 elements"):
        mxfp4.decode(blocks, scales, out=torch.empty(1535))
    with pytest.raises(ValueError, match="out= must be"):
        mxfp4.decode(blocks, scales, dtype=torch.bfloat16, out=buf)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_equals_transformers_bit_for_bit(dtype):
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 40, 4, 16), dtype=torch.uint8, generator=g)  # [E, out, G, 16]
    scales = torch.randint(0, 256, (3, 40, 4), dtype=torch.uint8, generator=g)  # every E8M0 scale, 255 too
    ref = convert_moe_packed_tensors(blocks, scales, dtype=dtype)  # [E, in, out]
    ours = mxfp4.decode(blocks, scales, dtype=dtype).transpose(1, 2).contiguous()  # [E, out, in] -> [E, in, out]
    assert ours.shape == ref.shape == (3, 128, 40)
    assert torch.equal(ours.view(_INT_VIEW[dtype]), ref.view(_INT_VIEW[dtype]))


def test_decode_realistic_scales_bit_for_bit_and_fp32_is_exact():
    g = torch.Generator().manual_seed(1)
    blocks = torch.randint(0, 256, (2, 64, 3, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(110, 135, (2, 64, 3), dtype=torch.uint8, generator=g)  # as in released checkpoints
    ref = convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16)
    ours32 = mxfp4.decode(blocks, scales).transpose(1, 2)
    assert torch.equal(ours32.to(torch.bfloat16).view(torch.int16), ref.view(torch.int16))  # E2M1·2^k fits bf16


def test_nibble_order_and_scale_bias():
    blocks = torch.zeros(1, 16, dtype=torch.uint8)
    blocks[0, 0] = 0x21  # low nibble 1 (0.5) is element 0, high nibble 2 (1.0) is element 1
    blocks[0, 1] = 0xF9  # low 9 (-0.5), high 15 (-6.0)
    out = mxfp4.decode(blocks, torch.tensor([128], dtype=torch.uint8))  # scale 2^(128-127) = 2
    assert out[:4].tolist() == [1.0, 2.0, -1.0, -12.0]
    assert out[4:].abs().sum() == 0


def _half_step(magnitude):
    # half the distance between neighbouring E2M1 values at this (block-scaled) magnitude
    return torch.where(magnitude < 2, 0.25, torch.where(magnitude < 4, 0.5, 1.0))


def test_encode_decode_round_trip_within_mxfp4_precision():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(4, 24, 96, generator=g) * torch.logspace(-3, 1, 24).view(1, 24, 1)  # many block scales
    blocks, scales = mxfp4.encode(w)
    assert blocks.shape == (4, 24, 3, 16) and scales.shape == (4, 24, 3) and blocks.dtype == scales.dtype == torch.uint8
    back = mxfp4.decode(blocks, scales)
    step = torch.ldexp(torch.ones(scales.shape), scales.int() - mxfp4.SCALE_BIAS).repeat_interleave(32, dim=-1)  # 2^e
    assert ((w - back).abs() <= _half_step(w.abs() / step) * step + 1e-12).all()
    assert ((w.abs() / step) <= mxfp4.FP4_MAX).all()  # no value clipped
    again = mxfp4.decode(*mxfp4.encode(back))  # representable values are kept exactly
    assert torch.equal(again, back)


def test_encode_zero_block_and_bad_shapes():
    blocks, scales = mxfp4.encode(torch.zeros(2, 32))
    assert torch.equal(mxfp4.decode(blocks, scales), torch.zeros(2, 32))
    with pytest.raises(ValueError, match="multiple of 32"):
        mxfp4.encode(torch.zeros(2, 24))
    with pytest.raises(ValueError, match="do not match"):
        mxfp4.decode(torch.zeros(2, 3, 16, dtype=torch.uint8), torch.zeros(2, 4, dtype=torch.uint8))
