"""What a NEXUS run needs, from a model's config alone: sizes, adapter size and memory per stage.

`make_plan` builds the model on the meta device (no weights are read or allocated); `format_plan`
is the table `nexus plan` prints. Memory figures are weights and optimizer state; activations
come on top.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..base.quantized import CHUNK_BYTES
from ..base.sources import quant_method, quantization_config
from ..moe import check_width, find_moe_blocks, shared_intermediate_size
from ..progress import format_bytes
from ..routing import routed_top_k

GIB = 1024**3
MXFP4_BYTES_PER_WEIGHT = 17 / 32  # 4-bit value + one 8-bit scale per block of 32
ADAMW_BYTES_PER_PARAM = 16  # fp32 master weight 4 + gradient 4 + two moments 8
BF16 = 2  # bytes per weight of the non-quantized base weights (as gpt-oss, DeepSeek-V3 and Qwen3 store them)


@dataclass
class Plan:
    model_type: str
    num_layers: int
    moe_layers: list[int]
    num_experts: int
    routed_top_k: int
    hidden_size: int
    expert_intermediate_size: int
    total_params: int
    active_params_per_token: int
    expert_params_per_expert: int
    shared_params_per_layer: int
    shared_params_total: int
    width_multiplier: float
    quantization: str | None
    adapter_bytes: int
    memory_bytes: dict


def expert_bytes_per_weight(config) -> float:
    """Bytes per routed-expert weight as the checkpoint stores them (and the native base keeps them)."""
    method = quant_method(config)
    if method == "mxfp4":
        return MXFP4_BYTES_PER_WEIGHT
    if method == "fp8":
        bo, bi = quantization_config(config).get("weight_block_size") or (128, 128)
        return 1 + 4 / (bo * bi)  # one byte + an fp32 scale per block
    return BF16


def make_plan(config, width_multiplier: float = 1) -> Plan:
    """Compute the plan for `config` (a transformers config) on a meta-device model."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    blocks = find_moe_blocks(model)
    layout = blocks[0].layout
    total = sum(p.numel() for p in model.parameters())
    expert_total = sum(p.numel() for b in blocks for p in b.experts.parameters())
    per_expert = sum(p.numel() for p in blocks[0].experts.parameters()) // layout.num_experts
    top_k = routed_top_k(config)
    embed = model.get_input_embeddings().weight.numel()
    # Active: every non-expert weight but the input embedding table (a row lookup), plus top-k experts.
    active = total - expert_total - embed + sum(top_k * b.layout.expert_numel() for b in blocks)
    shared_per_layer = layout.expert_numel(shared_intermediate_size(layout.intermediate_size, width_multiplier))
    shared_total = sum(b.layout.expert_numel(shared_intermediate_size(b.layout.intermediate_size, width_multiplier))
                       for b in blocks)
    adapter = shared_total * 4  # fp32
    biases = sum(p.numel() for b in blocks for n, p in b.experts.named_parameters() if n.endswith("_bias"))
    quantization = quant_method(config)
    # native: the experts as the checkpoint stores them, plus one bounded chunk of dequantized experts
    native_base = (total - expert_total) * BF16 + (expert_total - biases) * expert_bytes_per_weight(config) + \
        biases * BF16 + (CHUNK_BYTES if quantization else 0)
    dequantized_base = total * BF16
    optimizer = shared_total * ADAMW_BYTES_PER_PARAM
    memory = {
        # streaming convert holds a running fp32 sum, the expert being read and its decode buffer
        "convert_streaming": 3 * shared_per_layer * 4,
        "base_native": int(native_base),
        "base_dequantized": int(dequantized_base),
        "train_native_base": int(native_base + optimizer),
        "train_dequantized_base": int(dequantized_base + optimizer),
        "trainable_optimizer_state": optimizer,
        "teacher_logits_per_1k_tokens_fp32": int(config.vocab_size * 4 * 1024),
    }
    return Plan(model_type=config.model_type, num_layers=int(config.num_hidden_layers),
                moe_layers=[b.layer for b in blocks], num_experts=layout.num_experts, routed_top_k=top_k,
                hidden_size=layout.hidden_size, expert_intermediate_size=layout.intermediate_size,
                total_params=total, active_params_per_token=active, expert_params_per_expert=per_expert,
                shared_params_per_layer=shared_per_layer, shared_params_total=shared_total,
                width_multiplier=check_width(width_multiplier), quantization=quantization, adapter_bytes=adapter,
                memory_bytes=memory)


def _n(x: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f} {unit}"
    return str(int(x))


def format_plan(plan: Plan) -> str:
    rows = [
        ("model type", plan.model_type),
        ("decoder layers", str(plan.num_layers)),
        ("MoE layers", f"{len(plan.moe_layers)} (layers {plan.moe_layers[0]}..{plan.moe_layers[-1]})"),
        ("experts per layer", f"{plan.num_experts}, routed top-{plan.routed_top_k}"),
        ("hidden / expert intermediate", f"{plan.hidden_size} / {plan.expert_intermediate_size}"),
        ("total parameters", _n(plan.total_params)),
        ("active parameters per token", f"{_n(plan.active_params_per_token)} (excl. input embedding table)"),
        ("parameters per routed expert", _n(plan.expert_params_per_expert)),
        (f"shared expert per layer (width {plan.width_multiplier}x)", _n(plan.shared_params_per_layer)),
        ("quantized experts", plan.quantization or "none"),
        ("shared experts total (trainable)",
         f"{_n(plan.shared_params_total)} ({100 * plan.shared_params_total / plan.total_params:.2f}% of total)"),
        ("adapter on disk (fp32)", format_bytes(plan.adapter_bytes)),
    ]
    mem = plan.memory_bytes
    native = f"as stored ({plan.quantization} experts kept packed)" if plan.quantization else "as stored (bf16)"
    mem_rows = [
        ("convert, streaming from disk", mem["convert_streaming"]),
        (f"base {native}", mem["base_native"]),
        ("  = collect, validate, chat, precompute-teacher, convert check", mem["base_native"]),
        ("  train (+ shared experts, grads, AdamW)", mem["train_native_base"]),
    ]
    if plan.quantization:
        mem_rows += [
            ("base dequantized to bf16 (--dequantize)", mem["base_dequantized"]),
            ("  train (+ shared experts, grads, AdamW)", mem["train_dequantized_base"]),
        ]
    mem_rows += [
        ("trainable weights+grads+AdamW", mem["trainable_optimizer_state"]),
        ("teacher logits per 1k tokens (fp32)", mem["teacher_logits_per_1k_tokens_fp32"]),
    ]
    width = max(len(k) for k, _ in rows + mem_rows) + 2
    out = [f"{k:<{width}}{v}" for k, v in rows]
    out.append("")
    out.append("memory per process (weights and optimizer state; activations come on top; with --use-ddp "
               "every rank holds all of it)")
    out += [f"{k:<{width}}{v / GIB:8.2f} GiB" for k, v in mem_rows]
    out.append("online distillation reuses the frozen base as teacher (shared experts switched off): "
               "no second copy of the model")
    return "\n".join(out)
