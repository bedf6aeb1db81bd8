"""A quantized base kept packed: the same logits and the same shared-expert gradients as transformers'
dequantized model, without holding the dequantized experts."""

import json
import subprocess
import sys

import pytest
import torch
from quant_checkpoints import load_dequantized_reference, write_fp8_checkpoint, write_mxfp4_gpt_oss
from tiny import ROOT, subprocess_env

from nexus.base.loader import dequantized_nbytes, load_base_model, packed_nbytes
from nexus.base.quantized import is_quantized_experts
from nexus.moe import find_moe_blocks
from nexus.shared import attach_shared_experts, parameter_summary, shared_expert_modules

LOGIT_ATOL = 1e-5  # fp32 throughout: the packed path and transformers' dequantized path differ only in summation order
CASES = {  # name -> writer of a miniature checkpoint in a released layout
    "gpt_oss-mxfp4": write_mxfp4_gpt_oss,
    "qwen3_moe-fp8-per_expert": lambda d: write_fp8_checkpoint("qwen3_moe", d, "per_expert"),
    "qwen3_moe-fp8-fused": lambda d: write_fp8_checkpoint("qwen3_moe", d, "fused"),
    "deepseek_v3-fp8-per_expert": lambda d: write_fp8_checkpoint("deepseek_v3", d, "per_expert",
                                                                 prepare=routing_bias),
    "deepseek_v3-fp8-fused": lambda d: write_fp8_checkpoint("deepseek_v3", d, "fused", prepare=routing_bias),
}


def routing_bias(model):
    """DeepSeek-V3's router keeps a stored buffer (e_score_correction_bias) that changes which experts are
    chosen; a loader that skipped buffers would still match a freshly initialized (zero) one."""
    for name, buf in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buf.copy_(torch.randn(buf.shape, generator=torch.Generator().manual_seed(7)))


def reference_model(directory):
    """transformers' own dequantized view of the checkpoint, in fp32 (the reference nobody here wrote)."""
    return load_dequantized_reference(directory, dtype=torch.float32).eval()


@pytest.fixture(scope="module", params=list(CASES))
def quant_dir(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    CASES[request.param](d)
    return d


@pytest.fixture(scope="module")
def mxfp4_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpt-oss-mxfp4")
    write_mxfp4_gpt_oss(d)
    return d


def tokens(seed=0, shape=(2, 12)):
    return torch.randint(4, 96, shape, generator=torch.Generator().manual_seed(seed))


def test_experts_stay_packed_and_logits_match(quant_dir):
    model = load_base_model(str(quant_dir), dtype=torch.float32)
    blocks = find_moe_blocks(model)
    assert all(is_quantized_experts(b.experts) for b in blocks)
    assert all(p.element_size() == 1 for b in blocks for n, p in b.experts.named_parameters()
               if not n.endswith(("_bias", "_scale_inv")))
    ref = reference_model(quant_dir)
    for b, rb in zip(blocks, find_moe_blocks(ref)):
        assert b.layout == rb.layout  # logical sizes and flags read the same from the packed module
        for proj in b.experts.nexus_projections:  # the bytes decode to what transformers dequantizes
            assert torch.equal(b.experts.dequantized_weight(proj), getattr(rb.experts, proj))
    assert parameter_summary(model)["total"] == parameter_summary(ref)["total"]  # weights held, not bytes
    ref_buffers = dict(ref.named_buffers())
    for name, buf in model.named_buffers():  # stored buffers loaded (and computed ones recomputed) alike
        torch.testing.assert_close(buf, ref_buffers[name], rtol=0, atol=0, msg=name)
    ids = tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=LOGIT_ATOL, rtol=0)


def test_input_gradient_equals_autograd_through_transformers_experts(quant_dir):
    model = load_base_model(str(quant_dir), dtype=torch.float32)
    ref = reference_model(quant_dir)
    experts, ref_experts = find_moe_blocks(model)[-1].experts, find_moe_blocks(ref)[-1].experts
    g = torch.Generator().manual_seed(1)
    t, k, e = 40, 2, experts.num_experts
    x = torch.randn(t, 32, generator=g)
    index = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])  # (T, k) distinct experts
    weights = torch.rand(t, k, generator=g)
    outs = []
    for module in (experts, ref_experts):
        xi, wi = x.clone().requires_grad_(), weights.clone().requires_grad_()
        y = module(xi, index, wi)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outs.append((y.detach(), xi.grad, wi.grad))
    for got, want in zip(outs[0], outs[1]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert outs[0][1].abs().sum() > 0


def test_small_chunks_and_gaps_in_routing_reuse_one_buffer(mxfp4_dir, monkeypatch):
    """Chunks of two experts, some experts never routed (so a chunk is gathered, not sliced), and the same
    decode buffer for every chunk, forward and backward: still transformers' outputs and gradients."""
    from nexus.base import quantized

    model, ref = load_base_model(str(mxfp4_dir), dtype=torch.float32), reference_model(mxfp4_dir)
    experts, ref_experts = find_moe_blocks(model)[0].experts, find_moe_blocks(ref)[0].experts
    out_f, in_f = experts.nexus_projections["gate_up_proj"]
    monkeypatch.setattr(quantized, "CHUNK_BYTES", 2 * out_f * in_f * 4)  # two gate_up experts in fp32
    buffers = []
    real = quantized._workspace
    monkeypatch.setattr(quantized, "_workspace", lambda *a: buffers.append(real(*a)) or buffers[-1])
    index = torch.tensor([[0, 3], [5, 3], [7, 0], [3, 5], [6, 0]])  # experts 1, 2 and 4 unused: gaps
    weights = torch.rand(5, 2, generator=torch.Generator().manual_seed(4))
    outs = []
    for module in (experts, ref_experts):
        x = torch.randn(5, 32, generator=torch.Generator().manual_seed(5)).requires_grad_()
        y = module(x, index, weights)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outs.append((y.detach(), x.grad))
    for got, want in zip(outs[0], outs[1]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert len(buffers) >= 8  # 3 chunks for each of 2 projections, forward and backward
    assert len({b.untyped_storage().data_ptr() for b in buffers}) == 1  # one buffer, reused


def test_shared_expert_gradients_equal_the_dequantized_models(quant_dir):
    models = [load_base_model(str(quant_dir), dtype=torch.float32), reference_model(quant_dir)]
    ids = tokens(2)
    grads = []
    for m in models:
        attach_shared_experts(m, init="random", seed=3, gate=True)
        logits = m(ids).logits
        torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).backward()
        grads.append({f"{path}.{n}": p.grad for path, s in shared_expert_modules(m).items()
                      for n, p in s.named_parameters()})
        assert all(p.grad is None for n, p in m.named_parameters() if "nexus_shared_expert" not in n)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        assert grads[0][name].abs().sum() > 0, name
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-4, msg=name)


def test_no_dequantized_weight_is_saved_for_backward(mxfp4_dir):
    model = load_base_model(str(mxfp4_dir), dtype=torch.float32)
    experts = find_moe_blocks(model)[0].experts
    x = torch.randn(4, 32, requires_grad=True)  # 4 tokens x top-2: activations smaller than one expert's weight
    index = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7]])  # every expert routed to
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        experts(x, index, torch.rand(4, 2)).sum().backward()
    weight_dims = {tuple(s) for o, i in experts.nexus_projections.values() for s in ((o, i), (i, o))}
    assert saved
    assert not any(s[-2:] in weight_dims for s in saved if len(s) >= 2), saved
    one_expert = min(o * i for o, i in experts.nexus_projections.values())
    assert max(torch.Size(s).numel() for s in saved) < one_expert, saved


def test_dequantize_flag_uses_transformers_load(mxfp4_dir):
    model = load_base_model(str(mxfp4_dir), dtype=torch.float32, dequantize=True)
    assert not any(is_quantized_experts(b.experts) for b in find_moe_blocks(model))


def test_auto_dtype_is_the_checkpoints_own(mxfp4_dir):
    model = load_base_model(str(mxfp4_dir), dtype="auto")
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16  # stored bf16: not fp32 on CPU
    assert packed_nbytes(model) * 3 < dequantized_nbytes(model)


PEAK_SCRIPT = r"""
import json, resource, sys, torch
from transformers import AutoConfig
from nexus.convert.writer import write_checkpoint, random_gpt_oss_mxfp4_tensors, gpt_oss_mxfp4_nbytes, MXFP4_QUANTIZATION_CONFIG
from nexus.base import quantized
from nexus.base.loader import load_base_model, dequantized_nbytes
quantized.CHUNK_BYTES = 32 * 2**20  # the bound under test: a layer's experts (201 MB) decode in 32 MiB chunks
from nexus.shared import attach_shared_experts
d = sys.argv[1]
cfg = AutoConfig.for_model("gpt_oss", vocab_size=64, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                           num_local_experts=128, num_experts_per_tok=4, num_attention_heads=4, num_key_value_heads=2,
                           head_dim=64, layer_types=["full_attention"] * 2)
write_checkpoint(d, cfg, random_gpt_oss_mxfp4_tensors(cfg), total_bytes=gpt_oss_mxfp4_nbytes(cfg), num_shards=2,
                 quantization_config=MXFP4_QUANTIZATION_CONFIG)
def rss():  # peak resident bytes of this process so far
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
model = load_base_model(d, dtype=torch.float32)
attach_shared_experts(model, init="random", seed=0)
model(torch.randint(0, 64, (1, 8))).logits.float().pow(2).mean().backward()  # one-time allocations, 8 tokens
model.zero_grad(set_to_none=True)
before = rss()
ids = torch.randint(0, 64, (4, 128))  # 512 tokens x top-4: every expert is routed to
model(ids).logits.float().pow(2).mean().backward()
print(json.dumps({"before": before, "after": rss(), "dequantized": dequantized_nbytes(model, torch.float32)}))
"""


def test_forward_backward_peak_stays_below_the_dequantized_experts(tmp_path):
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(tmp_path / "ckpt")], capture_output=True, text=True,
                         env=subprocess_env(), cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["dequantized"] > 400e6  # 2 layers x 128 experts x (256 x 1024 + 512 x 256) fp32
    grown = r["after"] - r["before"]
    assert grown < r["dequantized"] / 2, r  # forward + backward: bounded chunks, nothing dequantized kept
