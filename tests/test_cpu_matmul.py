"""Frozen bf16 linears multiplied in fp32 on CPUs without a fast bf16 GEMM: the values and input gradients
of fp64 references; nn.Linear's own path where the GEMM is fast."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nexus.base import cpu_matmul
from nexus.base.cpu_matmul import CpuFp32Linear, compute_frozen_linears_in_fp32


@pytest.fixture(autouse=True)
def slow_bf16_gemm(monkeypatch):
    """These tests are about the fp32 path: take it whatever this machine's CPU has."""
    monkeypatch.setattr(cpu_matmul, "_fast_cpu_gemm", lambda dtype: False)


def test_a_fast_bf16_gemm_keeps_nn_linears_path(monkeypatch):
    lin = _frozen_bf16_linear()
    compute_frozen_linears_in_fp32(lin)
    x = torch.randn(4, 48).bfloat16().requires_grad_(True)
    monkeypatch.setattr(cpu_matmul, "_fast_cpu_gemm", lambda dtype: dtype == torch.bfloat16)
    assert not cpu_matmul.fp32_products(torch.bfloat16, "cpu") and cpu_matmul.fp32_products(torch.float16, "cpu")
    y = lin(x)
    assert torch.equal(y, nn.functional.linear(x, lin.weight, lin.bias))  # the bf16 product, as torch computes it
    assert "_FrozenLinear" not in type(y.grad_fn).__name__
    monkeypatch.setattr(cpu_matmul, "_fast_cpu_gemm", lambda dtype: False)
    assert "_FrozenLinear" in type(lin(x).grad_fn).__name__


@pytest.mark.parametrize("forced, fast", [("1", False), ("0", True)])
def test_environment_forces_the_choice(monkeypatch, forced, fast):
    monkeypatch.undo()  # the real _fast_cpu_gemm
    monkeypatch.setenv("NEXUS_CPU_FP32_PRODUCTS", forced)
    cpu_matmul._fast_cpu_gemm.cache_clear()
    try:
        assert cpu_matmul._fast_cpu_gemm(torch.bfloat16) is fast
        assert cpu_matmul.fp32_products(torch.bfloat16, "cpu") is not fast
        assert not cpu_matmul.fp32_products(torch.float32, "cpu") and not cpu_matmul.fp32_products(torch.bfloat16, "meta")
    finally:
        monkeypatch.delenv("NEXUS_CPU_FP32_PRODUCTS")
        cpu_matmul._fast_cpu_gemm.cache_clear()


def _frozen_bf16_linear(n_in=48, n_out=40, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(n_in, n_out, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n_out, n_in, generator=g) * 0.2)
        if bias:
            lin.bias.copy_(torch.randn(n_out, generator=g))
    return lin.to(torch.bfloat16).requires_grad_(False)


def test_values_and_input_gradient_match_fp64_over_several_slices(monkeypatch):
    monkeypatch.setattr(cpu_matmul, "SLICE_BYTES", 48 * 4 * 7)  # 7 rows a slice: 40 rows take 6 slices
    lin = _frozen_bf16_linear()
    state = {k: v.clone() for k, v in lin.state_dict().items()}
    assert compute_frozen_linears_in_fp32(nn.Sequential(lin)) == 1
    assert type(lin) is CpuFp32Linear and isinstance(lin, nn.Linear)
    assert all(torch.equal(state[k], v) for k, v in lin.state_dict().items())  # same parameters, same names
    x = torch.randn(2, 5, 48, generator=torch.Generator().manual_seed(1)).bfloat16().requires_grad_(True)
    y = lin(x)
    assert y.dtype == torch.bfloat16 and y.shape == (2, 5, 40)
    w64, b64 = lin.weight.double(), lin.bias.double()
    x64 = x.detach().double().requires_grad_(True)
    want = torch.nn.functional.linear(x64, w64, b64)
    torch.testing.assert_close(y.double(), want, rtol=1e-2, atol=1e-2)  # bf16 output rounding
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).bfloat16()
    y.backward(dy)
    want.backward(dy.double())
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-2, atol=1e-2)
    assert lin.weight.grad is None and lin.bias.grad is None
    # fp32 inputs see the fp32 products unrounded
    xf = x.detach().float()
    torch.testing.assert_close(lin(xf).double(), torch.nn.functional.linear(xf.double(), w64, b64),
                               rtol=1e-5, atol=1e-5)


def test_backward_keeps_only_the_frozen_weight():
    lin = _frozen_bf16_linear(n_in=64, n_out=256, bias=False)
    compute_frozen_linears_in_fp32(lin)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    x = torch.randn(3, 64).bfloat16().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = lin(x)
    assert len(saved) == 1 and saved[0] is lin.weight  # a reference to the bf16 parameter, no fp32 copy
    y.sum().backward()
    assert x.grad is not None


def test_trainable_fp32_and_other_layers_take_nn_linear_path():
    lin = _frozen_bf16_linear().requires_grad_(True)
    compute_frozen_linears_in_fp32(lin)
    x = torch.randn(4, 48).bfloat16()
    lin(x).float().sum().backward()
    assert lin.weight.grad is not None and lin.bias.grad is not None  # ordinary autograd: weights train
    fp32 = nn.Linear(8, 4).requires_grad_(False)
    compute_frozen_linears_in_fp32(fp32)
    x = torch.randn(2, 8)
    assert torch.equal(fp32(x), nn.functional.linear(x, fp32.weight, fp32.bias))


def test_a_loaded_base_computes_its_frozen_linears_in_fp32(tmp_path):
    from conftest import tiny_config
    from transformers import AutoModelForCausalLM

    from nexus.base.loader import load_base_model

    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(tiny_config("qwen3_moe")).to(torch.bfloat16)
    ref.save_pretrained(tmp_path)
    model = load_base_model(str(tmp_path))
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears and all(type(m) is CpuFp32Linear for m in linears)
    ids = torch.randint(3, 90, (2, 12))
    with torch.no_grad():
        got, want = model(ids).logits.double(), ref(ids).logits.double()
    exact = AutoModelForCausalLM.from_config(tiny_config("qwen3_moe"))  # fp32 copy of the bf16 weights
    exact.load_state_dict({k: v.float() for k, v in ref.state_dict().items()})
    with torch.no_grad():
        best = exact(ids).logits.double()
    # fp32 products land at least as close to the fp32 evaluation of the same weights as bf16 products do
    # (on AVX2 much closer; where the CPU has native bf16 dot products, AVX512-BF16 or AMX, torch's bf16
    # GEMM accumulates in fp32 too and the two differ only by rounding noise, hence the 5 % slack)
    assert (got - best).abs().mean() <= 1.05 * (want - best).abs().mean()
    torch.testing.assert_close(got, want, rtol=0.05, atol=0.05)
