"""Frozen bf16/fp16 linear layers multiplied in fp32 on CPUs whose low-precision GEMM is slow.

    compute_frozen_linears_in_fp32(model)   # every nn.Linear of a loaded base; a no-op off CPU
    fp32_products(torch.bfloat16, "cpu")    # True where bf16 products should be computed in fp32

torch's CPU matmul for bf16/fp16 takes oneDNN's GEMM where oneDNN supports the type on this CPU
(AVX-512 for bf16: `torch.ops.mkldnn._is_mkldnn_bf16_supported()`) and a generic GEMM
(`cpublas_gemm_impl`) elsewhere: on the AVX2 machine of docs/benchmarks.md that one ran at
0.3-5 GFLOP/s against 10-25 in fp32, so a low-precision base spent most of a training step in its
frozen attention projections, while on an AVX-512 BF16 machine bf16 products run 2-4 × faster than
fp32 ones. So where the fast GEMM is missing (`fp32_products`), the weight is upcast a slice of rows at
a time (at most `SLICE_BYTES` of fp32), multiplied in fp32, and the result cast back to the input's
dtype; the backward re-upcasts the same slices and returns the input gradient only: nothing but a
reference to the frozen weight is saved, so memory stays that of the bf16 model. Elsewhere, and for
trainable weights, fp32 weights and weights on another device, `nn.Linear`'s own path runs, decided at
each call. NEXUS_CPU_FP32_PRODUCTS=1 (or 0) forces the choice.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import nn

SLICE_BYTES = 64 << 20  # fp32 bytes of one upcast slice of a weight (a 201,088-row head: 5,825 rows at H 2880)
LOW_PRECISION = (torch.bfloat16, torch.float16)


def fp32_products(dtype: torch.dtype, device) -> bool:
    """Whether a frozen `dtype` product on `device` should be computed in fp32 (see the module docstring)."""
    return torch.device(device).type == "cpu" and dtype in LOW_PRECISION and not _fast_cpu_gemm(dtype)


@functools.cache
def _fast_cpu_gemm(dtype: torch.dtype) -> bool:
    forced = os.environ.get("NEXUS_CPU_FP32_PRODUCTS")
    if forced in ("0", "1"):
        return forced == "0"
    try:
        supported = (torch.ops.mkldnn._is_mkldnn_bf16_supported if dtype == torch.bfloat16
                     else torch.ops.mkldnn._is_mkldnn_fp16_supported)
        return bool(torch.backends.mkldnn.is_available() and supported())
    except (AttributeError, RuntimeError):
        return False


def _row_slices(weight: torch.Tensor):
    rows = max(1, SLICE_BYTES // max(1, weight.shape[1] * 4))
    for start in range(0, weight.shape[0], rows):
        yield slice(start, start + rows)


def linear_fp32(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """(n, in) @ (out, in).T + bias -> (n, out) in fp32, the weight upcast one slice of rows at a time."""
    xf = x.float()
    out = torch.empty(x.shape[0], weight.shape[0], dtype=torch.float32, device=x.device)
    for rows in _row_slices(weight):
        out[:, rows] = F.linear(xf, weight[rows].float(), None if bias is None else bias[rows].float())
    return out


def linear_fp32_input_grad(dy: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(n, out) gradient of `linear_fp32`'s output -> (n, in) gradient of its input, in fp32."""
    dyf = dy.float()
    dx = torch.zeros(dy.shape[0], weight.shape[1], dtype=torch.float32, device=dy.device)
    for rows in _row_slices(weight):
        dx.addmm_(dyf[:, rows], weight[rows].float())
    return dx


class _FrozenLinear(torch.autograd.Function):
    """y = x @ W.T + b with W, b frozen: fp32 products, dx only; saves W itself (a reference)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        flat = x.reshape(-1, x.shape[-1])  # (T, in)
        return linear_fp32(flat, weight, bias).to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        dx = None
        if ctx.needs_input_grad[0]:
            flat = grad.reshape(-1, grad.shape[-1])  # (T, out)
            dx = linear_fp32_input_grad(flat, weight).to(grad.dtype).reshape(*grad.shape[:-1], weight.shape[1])
        return dx, None, None


class CpuFp32Linear(nn.Linear):
    """An `nn.Linear` whose frozen low-precision weight is multiplied in fp32 on CPU (see module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight, self.bias
        if not fp32_products(w.dtype, w.device) or w.requires_grad or (b is not None and b.requires_grad):
            return super().forward(x)
        return _FrozenLinear.apply(x, w, b)


def compute_frozen_linears_in_fp32(model: nn.Module) -> int:
    """Make every plain `nn.Linear` of `model` a `CpuFp32Linear` (same parameters, same state dict).

    Returns how many were changed. Subclasses of nn.Linear (quantized or adapter layers) are left alone.
    """
    n = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = CpuFp32Linear
            n += 1
    return n
