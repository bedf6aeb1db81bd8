"""MXFP4 as GPT-OSS checkpoints store it: decode one expert at a time, and encode (tests, benchmarks).

OCP microscaling FP4: each block of 32 consecutive values along the input dimension shares one
E8M0 scale (a power of two, exponent bias 127); each value is E2M1 (1 sign, 2 exponent, 1 mantissa
bit), two values per byte, the low nibble first. On disk, for a weight whose parameter is
[E, in, out] (GPT-OSS's transposed layout):

    <param>_blocks  uint8 [E, out, in/32, 16]
    <param>_scales  uint8 [E, out, in/32]

Decoding gives [.., out, in]; transformers' dequantizer (`integrations.mxfp4.convert_moe_packed_tensors`)
then transposes to the parameter's [E, in, out]. `decode` mirrors its arithmetic exactly (a table
lookup, then `ldexp`), so the values are bit-for-bit the same. On CPU the decode is the C kernel of
`decode.c` (`nexus.base.native`; numpy's table lookup when no compiler is found), elsewhere torch ops.
"""

from __future__ import annotations

import torch

from . import native

BLOCK_SIZE = 32  # values sharing one scale
BYTES_PER_BLOCK = BLOCK_SIZE // 2  # two E2M1 values per byte
SCALE_BIAS = 127  # E8M0 exponent bias
SCALE_MAX = 255  # OCP reserves it for NaN; transformers' ldexp decodes it as 2^128, and so do we
# E2M1 code -> value; bit 3 is the sign.
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
FP4_MAX = 6.0
# Midpoints between consecutive non-negative E2M1 magnitudes: round-to-nearest boundaries.
_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_MIDPOINTS = tuple((a + b) / 2 for a, b in zip(_MAGNITUDES[:-1], _MAGNITUDES[1:]))


def decode(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantize MXFP4. blocks uint8 [..., G, 16], scales uint8 [..., G] -> [..., G*32] in `dtype`.

    The result keeps the stored orientation (for GPT-OSS experts [.., out, in]); the caller transposes.
    Each byte is looked up as its (low, high) value pair and multiplied by 2^(scale - 127): the same
    products transformers' `ldexp` computes, so the same bits. `out` (contiguous, `dtype`, as many
    elements as the result) receives the values when given: a caller decoding chunk after chunk reuses
    one buffer instead of faulting in fresh pages for each (on CPU that costs more than the decode).
    """
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.shape[-1] != BYTES_PER_BLOCK or tuple(blocks.shape[:-1]) != tuple(scales.shape):
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} do not match scales {tuple(scales.shape)} "
                         f"(expected blocks [..., G, {BYTES_PER_BLOCK}] and scales [..., G])")
    shape = (*scales.shape[:-1], scales.shape[-1] * BLOCK_SIZE)
    native.check_out(out, shape, dtype, blocks.device)
    if blocks.device.type == "cpu" and dtype in _NATIVE:
        result = native.decode(_NATIVE[dtype], (blocks, scales), shape, dtype, out, scales.numel())
        if result is not None:
            return result
    result = _decode_torch(blocks, scales, dtype)
    return result if out is None else out.view(shape).copy_(result)


def _decode_torch(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The decode without the native kernel: numpy's table lookup on CPU, embedding lookups elsewhere."""
    if blocks.device.type == "cpu" and dtype in _CPU_VIEWS:
        return _decode_cpu(blocks, scales, dtype)
    pairs, powers = _tables(blocks.device)
    *prefix, groups, nbytes = blocks.shape
    out = torch.nn.functional.embedding(blocks.int(), pairs)  # [..., G, 16, 2]: (low, high) per byte
    out = out.reshape(*prefix, groups, nbytes * 2)  # [..., G, 32]: low nibble first
    out.mul_(torch.nn.functional.embedding(scales.int(), powers))  # × 2^(scale - 127), [..., G, 1]
    top = scales == SCALE_MAX
    if top.any():  # 2^128 overflows fp32; ldexp gets x·2^128 as (x·2^127)·2, finite for x <= 1
        out[top] *= 2
    out = out.reshape(*prefix, groups * nbytes * 2)
    return out if dtype == torch.float32 else out.to(dtype)


_TABLES: dict = {}
_NATIVE = {torch.bfloat16: "nexus_mxfp4_bf16", torch.float32: "nexus_mxfp4_f32"}  # nexus.base.native kernels
_CPU_VIEWS = {torch.bfloat16: "int16", torch.float32: "float32"}  # numpy has no bf16: its bits as int16
_QUADS: dict = {}


def _decode_cpu(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The CPU decode: one lookup per two bytes (four values) in a 65536-entry table, then × 2^(scale-127).

    torch's CPU gather runs one index at a time; numpy's `take` over uint16 indices is several times
    faster (benchmarks/bench_scale.py measures it). Exact: each value is E2M1 × a power of two, which
    the table entry times the power represents exactly in bf16 and fp32, as in the fp32 path.
    """
    import numpy as np

    if dtype not in _QUADS:
        lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
        c = torch.arange(65536)
        quad = torch.stack([lut[c & 0xF], lut[(c >> 4) & 0xF], lut[(c >> 8) & 0xF], lut[c >> 12]], dim=1).to(dtype)
        _QUADS[dtype] = quad.view(torch.int16).numpy() if dtype == torch.bfloat16 else quad.numpy()  # [65536, 4]
    *prefix, groups, nbytes = blocks.shape
    codes = blocks.contiguous().numpy().view(np.uint16)  # [..., G, 8]: little-endian, so byte 0 is the low half
    values = torch.from_numpy(np.take(_QUADS[dtype], codes, axis=0, mode="wrap"))  # [..., G, 8, 4]
    out = values.view(dtype).reshape(*prefix, groups, nbytes * 2)  # [..., G, 32]
    _, powers = _tables(blocks.device)
    out.mul_(torch.nn.functional.embedding(scales.int(), powers).to(dtype))  # × 2^(scale - 127), [..., G, 1]
    top = scales == SCALE_MAX
    if top.any():  # as in `decode`: ldexp's 2^128 is 2^127 · 2
        out[top] *= 2
    return out.reshape(*prefix, groups * nbytes * 2)


def _tables(device) -> tuple[torch.Tensor, torch.Tensor]:
    """byte -> (low nibble's value, high nibble's value) [256, 2]; scale -> 2^(scale-127) [256, 1], fp32.

    Scale 255 maps to 2^127 here; `decode` doubles those blocks afterwards.
    """
    if device not in _TABLES:
        lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
        codes = torch.arange(256)
        pairs = torch.stack([lut[codes & 0x0F], lut[codes >> 4]], dim=1)
        powers = torch.ldexp(torch.ones(256), (codes.clamp(max=SCALE_MAX - 1) - SCALE_BIAS).int()).unsqueeze(1)
        _TABLES[device] = (pairs.to(device), powers.to(device))
    return _TABLES[device]


def encode(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize to MXFP4. weight [..., N], N a multiple of 32 -> blocks uint8 [..., N/32, 16], scales uint8 [..., N/32].

    Each block's scale is the smallest power of two that brings its largest magnitude within the
    E2M1 range (|x| <= 6); values round to the nearest E2M1 value (ties to the smaller magnitude).
    """
    n = weight.shape[-1]
    if n % BLOCK_SIZE:
        raise ValueError(f"MXFP4 needs the last dimension to be a multiple of {BLOCK_SIZE}, got {n}")
    x = weight.detach().float().reshape(*weight.shape[:-1], n // BLOCK_SIZE, BLOCK_SIZE)  # [..., G, 32]
    amax = x.abs().amax(dim=-1)  # [..., G]
    exponent = torch.ceil(torch.log2(amax / FP4_MAX)).nan_to_num(neginf=-SCALE_BIAS)
    exponent = exponent.clamp(-SCALE_BIAS, SCALE_BIAS).to(torch.int32)
    # log2 can be off by one ulp: make sure amax / 2^e <= 6 holds.
    exponent = exponent + (torch.ldexp(amax, -exponent) > FP4_MAX).int()
    exponent = exponent.clamp(-SCALE_BIAS, SCALE_BIAS)
    y = torch.ldexp(x, -exponent.unsqueeze(-1))  # [..., G, 32], |y| <= 6
    mids = torch.tensor(_MIDPOINTS, dtype=torch.float32, device=x.device)
    codes = torch.bucketize(y.abs().contiguous(), mids).to(torch.uint8)  # magnitude index 0..7
    codes |= (y < 0).to(torch.uint8) << 3
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)  # [..., G, 16]
    scales = (exponent + SCALE_BIAS).to(torch.uint8)
    return blocks.contiguous(), scales.contiguous()
