"""Plan a NEXUS run from a model's config alone: sizes, adapter size and memory per stage.

    nexus plan --model path/to/gpt-oss-120b            # a model directory or a bare config.json
    nexus plan --model config.json --width-multiplier 2 --json

The model is built on the meta device (no weights are read or allocated). Memory figures are for
weights and optimizer state; activations depend on batch size and sequence length and come on top.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .errors import NexusError
from .base.quantized import CHUNK_BYTES
from .base.sources import quant_method, quantization_config
from .moe import check_width, find_moe_blocks, shared_intermediate_size
from .routing import routed_top_k

HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # owner/name, as on the Hugging Face hub
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


def load_config(path: str | Path, trust_remote_code: bool = False):
    """A transformers config from a model directory or a bare config.json."""
    from transformers import AutoConfig

    given, path = str(path), Path(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise NexusError(f"--model {path}: directory holds no config.json")
        path = path / "config.json"
    if not path.is_file():
        if HUB_NAME.match(given):
            raise NexusError(f"--model {path}: no such local directory; a hub name is not fetched (nexus reads no "
                             f"network): download its config first, e.g. `hf download {path} config.json "
                             f"--local-dir {path.name}`, then `nexus plan --model {path.name}`")
        raise NexusError(f"--model {path}: no such model directory or config.json")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise NexusError(f"--model {path}: not valid JSON ({e})") from None
    model_type = data.get("model_type") if isinstance(data, dict) else None
    if not model_type:
        raise NexusError(f"--model {path}: config has no 'model_type'")
    from .base.loader import check_config_model_type

    check_config_model_type(data, f"--model {path}", trust_remote_code)
    if "auto_map" in data and trust_remote_code:  # custom code, allowed by the flag: the model directory's own
        try:
            return AutoConfig.from_pretrained(str(path.parent), trust_remote_code=trust_remote_code)
        except (OSError, ValueError, ImportError) as e:
            raise NexusError(f"--model {path}: cannot load its custom config ({e})") from None
    data.pop("model_type")
    try:
        return AutoConfig.for_model(model_type, **data)
    except ValueError as e:
        raise NexusError(f"--model {path}: unknown model_type '{model_type}' ({e})") from None


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
        ("adapter on disk (fp32)", f"{plan.adapter_bytes / GIB:.2f} GiB"),
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


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model directory or bare config.json (no weights are read)")
    p.add_argument("--width-multiplier", type=float, default=1,
                   help="shared expert intermediate size = this x the routed expert's (default 1)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow custom modeling code from the model directory (off by default)")


def run(args) -> int:
    check_width(args.width_multiplier)
    plan = make_plan(load_config(args.model, args.trust_remote_code), args.width_multiplier)
    print(json.dumps(asdict(plan), indent=2) if args.json else format_plan(plan))
    return 0
