"""Block FP8 as DeepSeek-V3 and Qwen3-*-FP8 checkpoints store it: decode, and encode (tests, benchmarks).

Each weight [..., out, in] is float8_e4m3fn; each (bo × bi) tile of it (128 × 128 in the released
checkpoints, `weight_block_size` in config.json) shares one float32 `weight_scale_inv`, the factor
that takes the stored values back to the weight:

    <module>.weight            float8_e4m3fn [..., out, in]
    <module>.weight_scale_inv  float32       [..., ceil(out/bo), ceil(in/bi)]

The grid is a ceiling: a dimension that is not a multiple of the block ends in a partial tile with a
scale of its own (DeepSeek-V3's `kv_a_proj_with_mqa` has 576 = 4.5 × 128 rows, scale grid [5, 56]).

`decode` multiplies in float32 and casts once, as transformers' load-time dequantizer
(`integrations.finegrained_fp8.Fp8Dequantize._dequantize_one`) does, so the values are bit-for-bit
the same wherever that function is defined. It is not defined on partial tiles: it infers the tile
from `shape // grid`, so it raises when a dimension is not divisible by its grid and silently uses
the wrong tile when it is (24 rows on a [2, ...] grid of 16-row tiles become two 12-row tiles).
`decode` follows the ceiling grid, as transformers' `_dequantize_fp8_weight` (its FP8 backward) does;
in float32 the two agree bit for bit (that one multiplies in the output dtype, so in bf16 it rounds
the scale first and may differ by an ulp).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import native

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448
BLOCK_SIZE = (128, 128)  # the released checkpoints' weight_block_size


def grid(shape, block_size=BLOCK_SIZE) -> tuple[int, ...]:
    """The scale grid of a weight of `shape` [..., out, in]: [..., ceil(out/bo), ceil(in/bi)]."""
    *prefix, rows, cols = shape
    return (*prefix, -(-rows // block_size[0]), -(-cols // block_size[1]))


def decode(weight: torch.Tensor, scale_inv: torch.Tensor, block_size=BLOCK_SIZE,
           dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantize block FP8. weight e4m3 [..., out, in], scale_inv fp32 [..., ceil(out/bo), ceil(in/bi)]
    -> [..., out, in] in `dtype`.

    value = float32(weight) × scale_inv of its tile, computed in float32, then cast to `dtype`. `out`
    (contiguous, `dtype`, as many elements) receives the values when given. On CPU the decode is the C
    kernel of `decode.c` (`nexus.base.native`), the same arithmetic; torch ops without a compiler.
    """
    if weight.dtype != FP8_DTYPE or scale_inv.dtype != torch.float32:
        raise ValueError(f"block FP8 needs float8_e4m3fn weights and float32 scales, got {weight.dtype} and "
                         f"{scale_inv.dtype}")
    bo, bi = block_size
    expected = grid(weight.shape, block_size)
    if tuple(scale_inv.shape) != expected:
        raise ValueError(f"FP8 weight {tuple(weight.shape)} with blocks {tuple(block_size)} needs scales "
                         f"{expected}, got {tuple(scale_inv.shape)}")
    *prefix, rows, cols = weight.shape
    native.check_out(out, weight.shape, dtype, weight.device)
    if weight.device.type == "cpu" and dtype in _NATIVE:
        result = native.decode(_NATIVE[dtype], (weight, scale_inv), weight.shape, dtype, out, math.prod(prefix),
                               rows, cols, bo, bi)
        if result is not None:
            return result
    result = _decode_torch(weight, scale_inv, block_size, dtype)
    return result if out is None else out.view(weight.shape).copy_(result)


_NATIVE = {torch.bfloat16: "nexus_fp8_bf16", torch.float32: "nexus_fp8_f32"}  # nexus.base.native kernels


def _decode_torch(weight: torch.Tensor, scale_inv: torch.Tensor, block_size, dtype: torch.dtype) -> torch.Tensor:
    bo, bi = block_size
    *prefix, rows, cols = weight.shape
    *_, grid_rows, grid_cols = grid(weight.shape, block_size)
    out = weight.to(torch.float32)
    pad_rows, pad_cols = grid_rows * bo - rows, grid_cols * bi - cols
    if pad_rows or pad_cols:  # partial tiles: pad to whole tiles, cut back below
        out = F.pad(out, (0, pad_cols, 0, pad_rows))
    out = out.reshape(*prefix, grid_rows, bo, grid_cols, bi)
    out.mul_(scale_inv.reshape(*prefix, grid_rows, 1, grid_cols, 1))
    out = out.reshape(*prefix, grid_rows * bo, grid_cols * bi)
    if pad_rows or pad_cols:
        out = out[..., :rows, :cols].contiguous()
    return out if dtype == torch.float32 else out.to(dtype)


def encode(weight: torch.Tensor, block_size=BLOCK_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize to block FP8. weight [..., out, in]
    -> (e4m3 [..., out, in], scale_inv fp32 [..., ceil(out/bo), ceil(in/bi)]).

    transformers' convention (`Fp8Quantize._quantize_one`), op for op: per tile scale = 448 / amax
    (1 for an all-zero tile), weight = clamp(w × scale, ±448) cast to e4m3 (round to nearest even),
    scale_inv = 1 / scale. Bit-identical to it on whole tiles; partial tiles (which `Fp8Quantize`
    leaves unquantized) take the amax of the values they hold.
    """
    bo, bi = block_size
    *prefix, rows, cols = weight.shape
    *_, grid_rows, grid_cols = grid(weight.shape, block_size)
    pad_rows, pad_cols = grid_rows * bo - rows, grid_cols * bi - cols
    w = F.pad(weight.detach().to(torch.float32), (0, pad_cols, 0, pad_rows))
    w = w.reshape(*prefix, grid_rows, bo, grid_cols, bi)
    amax = w.abs().amax(dim=(-3, -1))  # [..., grid_rows, grid_cols]
    scale = torch.where(amax > 0, FP8_MAX / torch.where(amax > 0, amax, torch.ones_like(amax)), torch.ones_like(amax))
    scale_inv = (1.0 / scale).to(torch.float32)
    q = (w * scale.unsqueeze(-1).unsqueeze(-3)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    q = q.reshape(*prefix, grid_rows * bo, grid_cols * bi)[..., :rows, :cols]
    return q.contiguous(), scale_inv.contiguous()
