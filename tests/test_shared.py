"""Shared experts on every required family, checked against transformers' own forward."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

import nexus
from nexus import __version__
from nexus.adapter import CONFIG_NAME, WEIGHTS_NAME, read_adapter_config
from nexus.errors import NexusError
from nexus.moe import find_moe_blocks
from nexus.shared import (SHARED_NAME, attach_shared_experts, init_shared_expert, parameter_summary, run_shared_expert,
                          shared_expert_modules, shared_experts_disabled)

from conftest import FAMILIES, VOCAB, tiny_model

MOE_LAYERS = {"deepseek_v3": [1, 2]}  # first_k_dense_replace=1 in the tiny config


def _ids(seed=0, batch=2, length=12):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g)


def test_zero_init_is_bit_identical_and_random_init_differs(family):
    model = tiny_model(family)
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
        nexus.attach_shared_experts(model, init="zero")
        zero = model(ids).logits
        for shared in shared_expert_modules(model).values():
            init_shared_expert(shared, "random", std=0.05)
        rand = model(ids).logits
    assert torch.equal(ref, zero)
    assert (rand - ref).abs().max() > 1e-3


def test_moe_layers_found_and_only_shared_params_train(family):
    model = tiny_model(family)
    nexus.attach_shared_experts(model)
    blocks = find_moe_blocks(model)
    assert [b.layer for b in blocks] == MOE_LAYERS.get(family, [0, 1])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(f".{SHARED_NAME}." in n for n in trainable)
    per_block = {n.rsplit(f".{SHARED_NAME}.", 1)[0] for n in trainable}
    assert per_block == {b.path for b in blocks}
    summary = parameter_summary(model)
    assert summary["trainable"] == sum(p.numel() for n, p in model.named_parameters() if n in trainable)


def test_trainable_router_option(family):
    model = tiny_model(family)
    nexus.attach_shared_experts(model, trainable_router=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    routers = {f"{b.path}.{b.router_name}.{n}" for b in find_moe_blocks(model) for n, _ in b.router.named_parameters()}
    assert routers and routers <= trainable
    assert trainable - routers and all(f".{SHARED_NAME}." in n for n in trainable - routers)


def test_shared_expert_equals_the_routed_expert_it_was_copied_from(family):
    model = tiny_model(family)
    nexus.attach_shared_experts(model)
    block = find_moe_blocks(model)[0]
    j = 5
    shared = getattr(block.block, SHARED_NAME)
    with torch.no_grad():
        for name, p in shared.named_parameters():
            p.copy_(getattr(block.experts, name)[j:j + 1])
        x = torch.randn(7, block.layout.hidden_size)
        expected = block.experts(x, torch.full((7, 1), j), torch.ones(7, 1))
        got = run_shared_expert(shared, x)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert got.abs().max() > 0


def test_base_state_dict_loads_into_patched_model(family):
    model = tiny_model(family)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    nexus.attach_shared_experts(model, init="random")
    result = model.load_state_dict(base_state, strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys and all(f".{SHARED_NAME}." in k for k in result.missing_keys)


def test_save_load_round_trip_reproduces_logits(family, tmp_path):
    base_dir = tmp_path / "base"
    tiny_model(family).save_pretrained(base_dir)
    model = nexus.load_model(base_dir)
    nexus.attach_shared_experts(model, init="random", gate=True, seed=1)
    ids = _ids(1)
    with torch.no_grad():
        expected = model(ids).logits
    nexus.save_adapter(model, tmp_path / "adapter")
    cfg = read_adapter_config(tmp_path / "adapter")
    assert cfg == replace(model.nexus_config, base_model_name_or_path=str(base_dir.resolve()), nexus_version=__version__)
    assert cfg.model_type == family and cfg.gate and cfg.init_strategy == "random"
    assert json.loads((tmp_path / "adapter" / CONFIG_NAME).read_text())["format"] == "nexus-adapter"
    keys = load_file(str(tmp_path / "adapter" / WEIGHTS_NAME)).keys()
    assert all(f".{SHARED_NAME}." in k for k in keys)
    reloaded = nexus.load_model(tmp_path / "adapter")
    with torch.no_grad():
        got = reloaded.eval()(ids).logits
    assert torch.equal(got, expected)


def test_generate_with_kv_cache_matches_no_cache(family):
    model = tiny_model(family)
    nexus.attach_shared_experts(model, init="random", seed=0)
    ids = _ids(2, batch=1, length=6)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(ids, use_cache=True, **kw)
        uncached = model.generate(ids, use_cache=False, **kw)
    assert cached.shape[1] == ids.shape[1] + 6
    assert torch.equal(cached, uncached)


def test_backward_with_gradient_checkpointing(family, monkeypatch):
    import nexus.shared

    model = tiny_model(family)
    nexus.attach_shared_experts(model, init="random", seed=0)
    model.activation_checkpointing_enable()
    model.train()
    calls = []
    blocks = find_moe_blocks(model)
    real = nexus.shared.run_shared_expert
    monkeypatch.setattr(nexus.shared, "run_shared_expert", lambda *a: calls.append(1) or real(*a))
    ids = _ids(3)
    logits = model(ids).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    assert len(calls) == len(blocks)
    loss.backward()
    assert len(calls) == 2 * len(blocks), "checkpointed layers were not recomputed in backward"
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_gate_starts_at_one_and_disabled_context_gives_the_base():
    model = tiny_model("gpt_oss")
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
        nexus.attach_shared_experts(model, init="random", gate=True, seed=0)
        for shared in shared_expert_modules(model).values():
            assert shared.nexus_gate.item() == 1.0
        with shared_experts_disabled(model):
            off = model(ids).logits
        on = model(ids).logits
    assert torch.equal(off, ref)
    assert not torch.equal(on, ref)


def test_bf16_base_keeps_fp32_shared_experts():
    model = tiny_model("qwen3_moe").to(torch.bfloat16)
    nexus.attach_shared_experts(model, init="random", seed=0)
    for shared in shared_expert_modules(model).values():
        assert all(p.dtype == torch.float32 for p in shared.parameters())
    with torch.no_grad():
        out = model(_ids()).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_width_multiplier_widens_the_shared_expert():
    model = tiny_model("mixtral")
    nexus.attach_shared_experts(model, width_multiplier=3)
    block = find_moe_blocks(model)[0]
    shared = getattr(block.block, SHARED_NAME)
    assert shared.down_proj.shape[0] == 1
    assert shared.down_proj.numel() == 3 * block.experts.down_proj[0].numel()


def test_dense_model_is_a_clear_error():
    from transformers import AutoModelForCausalLM, LlamaConfig

    dense = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                                         num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(NexusError, match="no MoE layers.*Supported families: gpt_oss"):
        nexus.attach_shared_experts(dense)


def test_attaching_twice_is_an_error():
    model = tiny_model("olmoe")
    nexus.attach_shared_experts(model)
    with pytest.raises(NexusError, match="already"):
        nexus.attach_shared_experts(model)


def test_adapter_for_another_model_type_or_layer_count_is_refused(tmp_path):
    tiny_model("qwen3_moe").save_pretrained(tmp_path / "qwen")
    tiny_model("mixtral").save_pretrained(tmp_path / "mixtral")
    tiny_model("qwen3_moe", num_hidden_layers=3).save_pretrained(tmp_path / "qwen3l")
    model = nexus.load_model(tmp_path / "qwen")
    nexus.attach_shared_experts(model)
    nexus.save_adapter(model, tmp_path / "adapter")
    with pytest.raises(NexusError, match="model_type 'qwen3_moe'.*'mixtral'"):
        nexus.load_model(tmp_path / "adapter", base_model=str(tmp_path / "mixtral"))
    with pytest.raises(NexusError, match=r"MoE layers \[0, 1\].*\[0, 1, 2\]"):
        nexus.load_model(tmp_path / "adapter", base_model=str(tmp_path / "qwen3l"))


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(NexusError, match="no such directory"):
        nexus.load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(NexusError, match="no config.json"):
        nexus.load_model(tmp_path / "empty")


@pytest.mark.parametrize("fam", FAMILIES)
def test_adapter_file_keys_follow_design(fam, tmp_path):
    model = tiny_model(fam)
    nexus.attach_shared_experts(model)
    nexus.save_adapter(model, tmp_path)
    keys = set(load_file(str(tmp_path / WEIGHTS_NAME)))
    for b in find_moe_blocks(model):
        assert f"{b.path}.{SHARED_NAME}.down_proj" in keys
    assert (tmp_path / CONFIG_NAME).is_file()


@pytest.mark.parametrize("width,expected", [(0.25, 4), (0.5, 8), (2, 32)])
def test_fractional_width_round_trips_through_an_adapter(tmp_path, width, expected):
    from nexus.adapter import load_model, save_adapter
    from nexus.moe import shared_intermediate_size

    assert shared_intermediate_size(2880, 0.25) == 704  # gpt-oss: a multiple of 64, the nearest to 720
    model = tiny_model("qwen3_moe")  # routed experts of 16 units
    model.save_pretrained(tmp_path / "base")
    base = load_model(tmp_path / "base")
    attach_shared_experts(base, init="random", width_multiplier=width, seed=0)
    shared = next(iter(shared_expert_modules(base).values()))
    assert shared.down_proj.shape == (1, 32, expected) and base.nexus_config.intermediate_size == expected
    save_adapter(base, tmp_path / "adapter")
    loaded = load_model(tmp_path / "adapter")
    ids = torch.randint(4, 96, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, base(ids).logits, rtol=0, atol=0)
    with pytest.raises(NexusError, match="--width-multiplier must be a positive number"):
        attach_shared_experts(tiny_model("qwen3_moe"), width_multiplier=-0.5)


def test_an_all_zero_gated_expert_learns_only_its_output_bias():
    """docs/train.md: with init zero, gate/up and down weights get exactly zero gradient; the down bias does not."""
    model = nexus.attach_shared_experts(tiny_model("gpt_oss"), init="zero")
    ids = torch.randint(model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    weights = {n: g for n, g in grads.items() if n.endswith("_proj")}
    biases = {n: g for n, g in grads.items() if n.endswith("down_proj_bias")}
    assert weights and all(g is not None and not g.any() for g in weights.values())
    assert biases and all(g.abs().sum() > 0 for g in biases.values())
