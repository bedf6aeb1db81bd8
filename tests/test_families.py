"""Every text MoE family of transformers: served correctly or refused by name, never guessed.

The families are enumerated from transformers itself: every causal-LM model type whose modeling file
builds experts with `use_experts_implementation`. A family that appears in neither `SUPPORTED` nor
`REFUSED` below fails `test_every_family_is_in_a_table`, so a transformers upgrade cannot slip one in.
Each supported family is checked on a tiny random model built here (hidden 32, 2 layers, 8 experts).
"""

from __future__ import annotations

import functools
import gc
import os
import re

import pytest
import torch

import nexus
import nexus.shared
from nexus.errors import NexusError
from nexus.families import FAMILY_RULES
from nexus.moe import find_moe_blocks
from nexus.routing import routed_top_k, router_hooks, router_probs
from nexus.shared import SHARED_NAME, init_shared_expert, shared_expert_modules, shared_experts_disabled

# transformers collects garbage while building a model; with every family's modeling module imported the
# heap is large, so freeze what exists now (the imports) and let each collection walk only new objects.
gc.freeze()

VOCAB = 96
SIZES = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=8, intermediate_size=48, moe_intermediate_size=16, expert_intermediate_size=16,
             max_position_embeddings=128, num_experts=8, num_local_experts=8, n_routed_experts=8, moe_num_experts=8,
             num_experts_per_tok=2, top_k_experts=2, first_k_dense_replace=1, n_group=1, topk_group=1, moe_topk=2, moe_k=2, experts_per_token=2,
             pad_token_id=0, eos_token_id=1, bos_token_id=2)

# Per-family changes to SIZES that the family's config needs to build a tiny model.
MLA = dict(kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
           num_key_value_heads=4, n_group=2, topk_group=1)
HYBRID = dict(layer_types=["linear_attention", "full_attention"], linear_num_heads=4, linear_head_dim=8,
              linear_num_key_heads=4, linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8)
TINY: dict[str, dict] = {
    "deepseek_v3": MLA, "sarvam_mla": MLA, "deepseek_v2": MLA, "glm4_moe_lite": MLA,
    "deepseek_v32": dict(MLA, q_lora_rank=16, mlp_layer_types=["dense", "sparse"], index_head_dim=16, index_n_heads=2,
                         layer_types=None),
    "glm_moe_dsa": dict(MLA, q_lora_rank=16, mlp_layer_types=["dense", "sparse"], index_head_dim=16, index_n_heads=2),
    "axk1": dict(MLA, q_lora_rank=16, mlp_layer_types=["dense", "sparse"]),
    "axk2": dict(MLA, q_lora_rank=16, mlp_layer_types=["dense", "sparse"], index_head_dim=16, index_n_heads=2,
                 layer_types=None),
    "dots1": dict(n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, layer_types=None, max_window_layers=2),
    "dots3_note_text": dict(MLA, q_lora_rank=16, mlp_layer_types=["dense", "sparse"], index_head_dim=16,
                            index_n_heads=2, layer_types=None, shared_experts_intermediate_size=16),
    "gemma4_text": dict(enable_moe_block=True, num_experts=8, top_k_experts=2, moe_intermediate_size=16,
                        layer_types=["sliding_attention", "full_attention"], hidden_size_per_layer_input=0,
                        vocab_size_per_layer_input=VOCAB, global_head_dim=8),
    "lfm2_moe": dict(num_dense_layers=1, layer_types=["conv", "full_attention"]),
    "beam": dict(mlp_layer_types=["dense", "sparse"], layer_types=["sliding_attention", "full_attention"]),
    "flint": dict(mlp_only_layers=[0], layer_types=["sliding_attention", "full_attention"],
                  shared_expert_intermediate_size=16),
    "jamba": dict(expert_layer_period=1, expert_layer_offset=0, attn_layer_period=2, attn_layer_offset=1,
                  use_mamba_kernels=False, mamba_dt_rank=4, mamba_d_state=4),
    "kimi_linear": dict(MLA, mlp_layer_types=["dense", "sparse"], num_experts_per_token=2, **HYBRID),
    "qwen3_next": dict(HYBRID, shared_expert_intermediate_size=16),
    "qwen3_5_moe_text": dict(HYBRID, shared_expert_intermediate_size=16),
    "qwen4_exp_text": dict(HYBRID, shared_expert_intermediate_size=16, indexer_n_heads=2, indexer_kv_heads=1,
                           indexer_head_dim=8, indexer_budget=8, indexer_compress_ratio=2, hc_lowrank=8,
                           ple_embed_dim=32, ngram_vocab_size_base=128, make_ngram_vocab_size_divisible_by=8,
                           heads_per_ngram=2, split_ngram_parts=4),
    "nemotron_h": dict(moe_latent_size=16, moe_shared_expert_intermediate_size=16),  # latent MoE: experts at 16
    "zaya": dict(num_experts_per_tok=1, router_hidden_size=16, layer_types=["hybrid", "hybrid"]),
    "granitemoehybrid": dict(layer_types=["mamba", "attention"], mamba_n_heads=4, mamba_d_state=8, mamba_d_head=16,
                             mamba_chunk_size=8),
    "bailing_hybrid": dict(MLA, mlp_layer_types=["dense", "sparse"], num_experts_per_token=2, layer_group_size=2,
                           **HYBRID),
}

# Multimodal wrappers whose text model is the case that is built (same experts, same blocks).
TESTED_AS = {"gemma4": "gemma4_text", "dots3_note": "dots3_note_text", "qwen3_5_moe": "qwen3_5_moe_text",
             "qwen4_exp": "qwen4_exp_text"}

SUPPORTED = [
    "afmoe", "aria_text", "axk1", "axk2", "bailing_hybrid", "beam", "cohere2_moe", "deepseek_v2", "deepseek_v3",
    "deepseek_v32", "deepseek_v4", "dots1", "dots3_note_text", "ernie4_5_moe", "exaone_moe", "flex_olmo", "flint",
    "gemma4_text", "glm4_moe", "glm4_moe_lite", "glm_moe_dsa", "gpt_oss", "granitemoe", "granitemoe_swa",
    "granitemoehybrid", "granitemoeshared", "hunyuan_v1_moe", "hy_v3", "hy_v4", "inkling2_loop_text",
    "inkling2_text", "inkling_text", "jamba", "kimi_linear", "kolibri1", "laguna", "lara_mini", "lfm2_moe",
    "mellum", "mimo_v2_flash", "minimax", "minimax_m2", "minimax_m3_vl_text", "mixtral", "nemotron_h", "olmoe",
    "phimoe", "qwen2_moe", "qwen3_5_moe_text", "qwen3_moe", "qwen3_next", "qwen4_exp_text", "sarvam_mla",
    "sarvam_moe", "solar_open",
]
REFUSED: dict[str, str] = {"zaya": "skip expert"}  # model type -> a fragment of the NexusError message


def _transformers_families() -> set[str]:
    """Causal-LM model types whose modeling file builds experts with `use_experts_implementation`."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    root = os.path.join(os.path.dirname(transformers.__file__), "models")
    classes = set()
    for name in os.listdir(root):
        path = os.path.join(root, name, f"modeling_{name}.py")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                text = f.read()
            if "@use_experts_implementation" in text:
                classes.update(re.findall(r"^class (\w+)\(", text, re.M))
    found = {t for t, cls in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items() if isinstance(cls, str) and cls in classes}
    return found


def test_every_family_is_in_a_table():
    families = _transformers_families()
    listed = set(SUPPORTED) | set(REFUSED) | set(TESTED_AS)
    assert families - listed == set(), "new MoE families: add them to SUPPORTED or REFUSED"
    assert listed - families == set(), "families no longer in transformers"


def tiny_config(model_type: str):
    """SIZES where the family's config has the field, then the family's own TINY changes."""
    from transformers import AutoConfig

    defaults = AutoConfig.for_model(model_type).to_dict()
    kw = {k: v for k, v in SIZES.items() if k in defaults}
    kw.update(TINY.get(model_type, {}))
    return AutoConfig.for_model(model_type, **kw)


def _tiny_model(model_type: str):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type), dtype=torch.float32)
    with torch.no_grad():  # routers start at zero in several families' init; give them weight
        for name, p in model.named_parameters():
            if re.search(r"(router|gate)(\.\w+)?\.weight$", name) and p.dim() == 2:
                p.normal_(0, 0.5)
    return model.eval()


def _record_input(store, layer, module, args, kwargs):
    store.setdefault(layer, args[0] if args else kwargs["hidden_states"])


def _record_call(store, layer, module, args, kwargs, output):
    store.setdefault(layer, (args, kwargs, output))


def _ids(batch=2, length=6):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("model_type", SUPPORTED)
def test_family_is_served_exactly(model_type, monkeypatch):
    model = _tiny_model(model_type)
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
    nexus.attach_shared_experts(model, init="zero")
    blocks = find_moe_blocks(model)
    rule = FAMILY_RULES.get(model_type)
    assert all(b.attach == (rule.attach if rule else "block") for b in blocks)

    # 1. Zero init: bit-identical logits.
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)

    # 2./3. Non-zero shared expert: hooked output = output with it off + run_shared_expert(input), and
    # its input is exactly the routed experts' input. The router's output is read and checked too.
    for shared in shared_expert_modules(model).values():
        init_shared_expert(shared, "random", std=0.5, generator=torch.Generator().manual_seed(1))
    calls, experts_in, hooked_io, routing = {}, {}, {}, {}
    real = nexus.shared.run_shared_expert
    monkeypatch.setattr(nexus.shared, "run_shared_expert",
                        lambda shared, x: calls.setdefault(id(shared), (x, real(shared, x)))[1])
    handles = []
    for b in blocks:
        handles.append(b.experts.register_forward_pre_hook(
            functools.partial(_record_input, experts_in, b.layer), with_kwargs=True))
        handles.append(b.hooked.register_forward_hook(
            functools.partial(_record_call, hooked_io, b.layer), with_kwargs=True))
    with torch.no_grad(), router_hooks(model, lambda layer, lg, w, i: routing.setdefault(layer, (lg, w, i))):
        model(ids)
    for h in handles:
        h.remove()
    monkeypatch.setattr(nexus.shared, "run_shared_expert", real)
    assert set(experts_in) == set(hooked_io) == set(routing) == {b.layer for b in blocks}
    for b in blocks:
        shared = getattr(b.block, SHARED_NAME)
        x, shared_out = calls[id(shared)]
        assert torch.equal(x.reshape(-1, x.shape[-1]), experts_in[b.layer].reshape(-1, x.shape[-1])), b.path
        args, kwargs, out = hooked_io[b.layer]
        with torch.no_grad(), shared_experts_disabled(model):
            off = b.hooked(*args, **kwargs)
        out, off = (out[0], off[0]) if isinstance(out, tuple) else (out, off)
        assert shared_out.abs().max() > 1e-3 * off.abs().max(), "shared contribution too small to test"
        torch.testing.assert_close(out, off + real(shared, args[0] if args else kwargs["hidden_states"]),
                                   rtol=1e-5, atol=1e-6)
        logits, weights, indices = routing[b.layer]
        probs = router_probs(logits)
        assert probs.shape == (x.reshape(-1, x.shape[-1]).shape[0], b.layout.num_experts)
        torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[0]))
        assert indices.max() < b.layout.num_experts and indices.shape[1] == routed_top_k(model.config)

    # 4. One backward: gradients reach every shared expert and nothing else.
    model.train()
    logits = model(ids).logits
    torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).backward()
    for name, p in model.named_parameters():
        if f".{SHARED_NAME}." in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None or not p.grad.any(), name
@pytest.mark.parametrize("model_type", sorted(REFUSED))
def test_family_is_refused_by_name(model_type):
    model = _tiny_model(model_type)
    with pytest.raises(NexusError, match=rf"model type '{model_type}\b.*{REFUSED[model_type]}"):
        nexus.attach_shared_experts(model)


def test_decoder_layer_moe_without_a_rule_is_refused_by_name(monkeypatch):
    """Gemma 4 keeps router and experts in the decoder layer: without its rule it must not be attached to."""
    monkeypatch.delitem(FAMILY_RULES, "gemma4_text")
    with pytest.raises(NexusError, match=r"model type 'gemma4_text'.*directly in decoder layer model\.layers\.0"):
        nexus.attach_shared_experts(_tiny_model("gemma4_text"))


def test_latent_moe_without_a_rule_is_refused_by_name(monkeypatch):
    """Nemotron-H with moe_latent_size runs its experts at width 16 inside a block that receives 32."""
    monkeypatch.delitem(FAMILY_RULES, "nemotron_h")
    with pytest.raises(NexusError, match=r"model type 'nemotron_h'.*width 16 but the block receives hidden_size 32"):
        nexus.attach_shared_experts(_tiny_model("nemotron_h"))


def test_latent_shared_expert_is_built_at_the_experts_width():
    model = nexus.attach_shared_experts(_tiny_model("nemotron_h"), init="random", seed=0)
    for b in find_moe_blocks(model):
        assert b.layout.hidden_size == 16 and b.hooked is b.experts
        assert getattr(b.block, SHARED_NAME).down_proj.shape[1:] == b.experts.down_proj.shape[1:]


def test_experts_fed_something_else_than_the_block_input_is_refused_at_forward():
    """The check runs on every forward: a block that transforms its input before the experts is caught."""
    model = nexus.attach_shared_experts(_tiny_model("mixtral"))
    find_moe_blocks(model)[0].experts.register_forward_pre_hook(lambda m, args: (args[0] * 2,) + args[1:],
                                                                prepend=True)
    with pytest.raises(NexusError, match=r"model type 'mixtral'.*experts of model\.layers\.0\.mlp receive a tensor "
                                         r"other than the block's input"):
        model(_ids())


def test_router_output_of_another_form_is_refused_by_name():
    model = nexus.attach_shared_experts(_tiny_model("qwen3_moe"))
    find_moe_blocks(model)[0].router.register_forward_hook(lambda m, args, out: out[0])
    with pytest.raises(NexusError, match=r"model type 'qwen3_moe'.*router of model\.layers\.0\.mlp returns"):
        with router_hooks(model, lambda *a: None):
            model(_ids())


def test_probability_router_is_read_as_log_probabilities():
    """Gemma 4's router returns softmax probabilities: statistics must see them once, not softmaxed again."""
    model = _tiny_model("gemma4_text")
    seen, got = [], []
    block = find_moe_blocks(model)[0]
    block.router.register_forward_hook(lambda m, args, out: seen.append(out[0]))
    with torch.no_grad(), router_hooks(model, lambda layer, lg, w, i: got.append(lg) if layer == block.layer else None):
        model(_ids())
    torch.testing.assert_close(router_probs(got[0]), seen[0].float())


def test_muse_spark_latent_moe_is_refused_by_name():
    """Muse Spark (no causal-LM class; its text model only) projects to moe_hidden_size before its experts."""
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.for_model("muse_spark_text", **{**{k: v for k, v in SIZES.items() if "token_id" not in k},
                                                         "moe_hidden_size": 16})
    with pytest.raises(NexusError, match=r"model type 'muse_spark_text'.*width 16 but the block receives hidden_size 32"):
        nexus.attach_shared_experts(AutoModel.from_config(config))
