"""Tiny random models of every required family, built in the test process (no downloads)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

VOCAB = 96
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
              max_position_embeddings=128, pad_token_id=0, eos_token_id=1, bos_token_id=2)


def tiny_config(family: str, **overrides):
    """A tiny config of `family`; hidden (32) differs from expert intermediate (16/24) so layout errors show."""
    from transformers import AutoConfig

    if family == "gpt_oss":
        kw = dict(COMMON, num_hidden_layers=2, intermediate_size=24, num_local_experts=8, num_experts_per_tok=2,
                  sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    elif family == "qwen3_moe":
        kw = dict(COMMON, num_hidden_layers=2, intermediate_size=48, moe_intermediate_size=16, num_experts=8,
                  num_experts_per_tok=2, norm_topk_prob=True)
    elif family == "qwen2_moe":
        kw = dict(COMMON, num_hidden_layers=2, intermediate_size=48, moe_intermediate_size=16, num_experts=8,
                  num_experts_per_tok=2, shared_expert_intermediate_size=24)
    elif family == "mixtral":
        kw = dict(COMMON, num_hidden_layers=2, intermediate_size=16, num_local_experts=8, num_experts_per_tok=2)
    elif family == "olmoe":
        kw = dict(COMMON, num_hidden_layers=2, intermediate_size=16, num_experts=8, num_experts_per_tok=2)
    elif family == "deepseek_v3":
        kw = dict(COMMON, num_hidden_layers=3, intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8,
                  num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1,
                  kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
                  num_key_value_heads=4)
        kw.pop("head_dim")
    else:
        raise ValueError(family)
    kw.update(overrides)
    return AutoConfig.for_model(family, **kw)


def tiny_model(family: str, seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides), dtype=torch.float32)
    # Routers start at zero in several families' init; give them weight so routing is non-trivial.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if (name.endswith("router.weight") or name.endswith("gate.weight")) and p.dim() == 2:
                p.normal_(0, 0.5)
    return model.eval()


FAMILIES = ["gpt_oss", "qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v3", "olmoe"]


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param
