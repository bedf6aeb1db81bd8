"""What a NEXUS run needs, from a model's config alone: sizes, adapter size and memory per stage.

`make_plan` builds the model on the meta device (no weights are read or allocated); `format_plan`
is the table `nexus plan` prints. Memory figures are weights and optimizer state; activations
come on top. Non-quantized weights (and collect's hidden states) are sized in the dtype the verbs
load them in under `--dtype` (`base_dtype`: auto as the loaders resolve it). Given a device count
(and memory), the plan also says what each rank holds with the base replicated on every rank
(`--use-ddp`) or sharded across them (`--shard-base`, FSDP2 with one unit per decoder layer), and
which of the two fits.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..base.quantized import CHUNK_BYTES
from ..base.sources import quant_method, quantization_config
from ..device import canonical_dtype, torch_dtype
from ..errors import NexusError
from ..moe import check_width, find_moe_blocks, shared_intermediate_size
from ..progress import format_bytes
from ..routing import routed_top_k
from ..stats.reservoir import sample_bytes
from ..teacher.cache import bytes_per_token
from ..teacher.precompute import PrecomputeConfig

GIB = 1024**3
MXFP4_BYTES_PER_WEIGHT = 17 / 32  # 4-bit value + one 8-bit scale per block of 32
ADAMW_BYTES_PER_PARAM = 16  # fp32 master weight 4 + gradient 4 + two moments 8
TRAINABLE_GATHERED_BYTES_PER_PARAM = 8  # a gathered layer's shared expert: fp32 weight + its unsharded gradient
BASE_STAGES = "collect, validate, precompute-teacher"  # the verbs that hold the base only
TEACHER_TOP_K = next(f.default for f in dataclasses.fields(PrecomputeConfig) if f.name == "top_k")


@dataclass
class RankMemory:
    """What each rank holds for one stage, form of the base and layout across devices (bytes)."""

    stage: str  # "train", or "base": collect, validate, precompute-teacher (the base only)
    base_form: str  # "native" (quantized experts kept packed) or "dequantized" (--dequantize)
    layout: str  # "replicated" (--use-ddp) or "sharded" (--shard-base)
    base_bytes: int  # the frozen base's weights on the rank: all of them replicated, 1/N sharded
    gathered_layers_bytes: int  # sharded: the largest decoder layer unsharded, twice (in use + prefetched), + the root
    trainable_bytes: int  # shared experts' fp32 weights, grads and AdamW moments: all replicated, 1/N sharded
    decode_chunk_bytes: int  # quantized experts dequantized a chunk at a time (native form only)
    total_bytes: int
    fits: bool | None  # total within --device-memory; None without it


@dataclass
class DevicePlan:
    """Per-rank memory on `devices` devices, replicated and sharded, and (with a memory) what fits."""

    devices: int
    device_memory_bytes: int | None
    largest_layer: int  # the decoder layer with the most bytes as stored
    largest_layer_bytes: dict  # base form -> that layer's bytes (the largest in each form)
    per_rank: list[RankMemory]
    verdicts: dict  # "train/native", "base/dequantized", ... -> "replicated", "sharded" or "does not fit"


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
    devices: DevicePlan | None = None
    dtype: str = "bfloat16"  # the base's non-quantized weights as loaded (--dtype, auto resolved: `base_dtype`)
    dtype_source: str = ""  # how it was chosen: "--dtype", or what auto read
    dequantized_dtype: str = "bfloat16"  # the whole base under --dequantize (transformers' auto: the config first)
    raw_sample: dict | None = None  # collect --keep-raw N [--keep-hidden]: what the sample costs


def expert_bytes_per_weight(config, weight_bytes: int) -> float:
    """Bytes per routed-expert weight as the native base keeps them: packed as the checkpoint stores them,
    or `weight_bytes` (the loaded dtype's) for unquantized experts."""
    method = quant_method(config)
    if method == "mxfp4":
        return MXFP4_BYTES_PER_WEIGHT
    if method == "fp8":
        bo, bi = quantization_config(config).get("weight_block_size") or (128, 128)
        return 1 + 4 / (bo * bi)  # one byte + an fp32 scale per block
    return weight_bytes


def _config_dtype(config) -> torch.dtype | None:
    dtype = getattr(config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None


def _stored_dtype(path) -> torch.dtype | None:
    """The dtype most float tensors of the checkpoint at `path` are stored in, from the shards' headers;
    None for a bare config.json or a directory without (all of) its shards."""
    if path is None or not Path(path).is_dir():
        return None
    from ..base.files import SafetensorsDir
    from ..base.loader import stored_float_dtype

    try:
        return stored_float_dtype(SafetensorsDir(path))
    except NexusError:
        return None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def base_dtype(config, dtype: str = "auto", stored: torch.dtype | None = None,
               dequantize: bool = False) -> tuple[torch.dtype, str]:
    """The dtype the verbs load the base's non-quantized weights in (their activations too) under `--dtype`,
    and how it was chosen: an explicit dtype as given; auto as the loaders resolve it. NEXUS's loader of a
    quantized checkpoint takes the dtype its float tensors are stored in; transformers' (unquantized, or
    `dequantize`) the config's dtype first. Either falls back on the other; with neither (a bare config that
    names none, as gpt-oss's) bf16, as the released MoE checkpoints store their weights. `stored`: the
    shards' dtype (`_stored_dtype`), None where unknown."""
    if dtype != "auto":
        return torch_dtype(dtype), "--dtype"
    named = _config_dtype(config)
    order = [(named, "the config's dtype"), (stored, "as stored in the shards")]
    if quant_method(config) and not dequantize:
        order.reverse()
    for found, source in order:
        if found is not None:
            return found, f"auto: {source}"
    return torch.bfloat16, "auto: assumed, the config names none"


def check_devices(devices: int | None, device_memory: float | None) -> None:
    """Raise `NexusError` naming the flag for a device count below 1 or a memory that is not > 0 GiB."""
    if devices is not None and devices < 1:
        raise NexusError(f"--devices {devices}: expected a number of devices >= 1")
    if device_memory is not None and not (math.isfinite(device_memory) and device_memory > 0):
        raise NexusError(f"--device-memory {device_memory}: expected GiB per device > 0")


def stored_bytes_by_layer(model, blocks, config, weight_bytes: int, dequantized_bytes: int) -> tuple[dict, dict]:
    """Bytes of the base's weights per decoder layer (key None: embeddings, LM head, final norm) as the
    native base holds them (quantized routed-expert weights packed, all else `weight_bytes` per value) and
    dequantized (`dequantized_bytes` per value)."""
    bpw = expert_bytes_per_weight(config, weight_bytes)
    expert_weights = {id(p) for b in blocks for n, p in b.experts.named_parameters() if not n.endswith("_bias")}
    prefix = blocks[0].path[:blocks[0].path.index(f"layers.{blocks[0].layer}")] + "layers."
    native, dequantized = {}, {}
    for name, p in model.named_parameters():
        layer = int(name[len(prefix):].split(".")[0]) if name.startswith(prefix) else None
        native[layer] = native.get(layer, 0) + p.numel() * (bpw if id(p) in expert_weights else weight_bytes)
        dequantized[layer] = dequantized.get(layer, 0) + p.numel() * dequantized_bytes
    return native, dequantized


def check_raw_sample(keep_raw: int, keep_hidden: bool) -> None:
    """Raise `NexusError` naming the flag for a negative --keep-raw, or --keep-hidden without a sample."""
    if keep_raw < 0:
        raise NexusError(f"--keep-raw {keep_raw}: expected a number of tokens per layer >= 0")
    if keep_hidden and not keep_raw:
        raise NexusError("--keep-hidden keeps the hidden states of the --keep-raw sample: pass --keep-raw N too")


def raw_sample_plan(moe_layers: int, num_experts: int, hidden_size: int, keep_raw: int, keep_hidden: bool,
                    devices: int, activation_bytes: int) -> dict:
    """What `collect --keep-raw N [--keep-hidden]` holds: the running sample on each collecting device, one
    layer of it gathered from every rank at each flush, twice the sample in the main rank's host memory
    while a flush merges and writes it, and the file. Hidden states are kept in the model's dtype
    (`activation_bytes` per value)."""
    hidden_bytes = activation_bytes if keep_hidden else 0
    layer = sample_bytes(1, num_experts, keep_raw, hidden_size if keep_hidden else 0, hidden_bytes)
    sample = layer * moe_layers
    return {"tokens_per_layer": keep_raw, "hidden": keep_hidden, "hidden_bytes_per_value": hidden_bytes,
            "device_bytes": sample, "flush_gathered_bytes": devices * layer, "flush_host_bytes": 2 * sample,
            "disk_bytes": sample}


def make_plan(config, width_multiplier: float = 1, devices: int | None = None,
              device_memory: float | None = None, keep_raw: int = 0, keep_hidden: bool = False,
              dtype: str = "auto", path=None) -> Plan:
    """Compute the plan for `config` (a transformers config) on a meta-device model.

    `dtype` is the verbs' `--dtype` (a name of `device.DTYPES`); `path`, the model directory the config
    came from, lets auto read the shards' stored dtype as the quantized loader does (`base_dtype`).
    With `devices` (or `device_memory`, GiB per device, alone: one device) the plan includes what
    each rank holds replicated and sharded (`Plan.devices`); with `keep_raw` what collect's raw sample
    of that many tokens per layer (and their hidden states, `keep_hidden`) costs (`Plan.raw_sample`).
    """
    from transformers import AutoModelForCausalLM

    check_devices(devices, device_memory)
    check_raw_sample(keep_raw, keep_hidden)
    dtype = canonical_dtype(dtype)
    stored = _stored_dtype(path) if dtype == "auto" else None  # the shards' headers, read once
    loaded, source = base_dtype(config, dtype, stored)
    dequantized_dtype, _ = base_dtype(config, dtype, stored, dequantize=True)
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
    shared_by_layer = {b.layer: b.layout.expert_numel(shared_intermediate_size(b.layout.intermediate_size,
                                                                                 width_multiplier))
                       for b in blocks}
    shared_per_layer = shared_by_layer[blocks[0].layer]
    shared_total = sum(shared_by_layer.values())
    adapter = shared_total * 4  # fp32
    quantization = quant_method(config)
    chunk = CHUNK_BYTES if quantization else 0
    native_layers, dequantized_layers = stored_bytes_by_layer(model, blocks, config, loaded.itemsize,
                                                              dequantized_dtype.itemsize)
    # native: the experts as the checkpoint stores them, plus one bounded chunk of dequantized experts
    native_base = sum(native_layers.values()) + chunk
    dequantized_base = total * dequantized_dtype.itemsize
    optimizer = shared_total * ADAMW_BYTES_PER_PARAM
    memory = {
        # streaming convert holds a running fp32 sum, the expert being read and its decode buffer
        "convert_streaming": 3 * shared_per_layer * 4,
        "base_native": int(native_base),
        "base_dequantized": int(dequantized_base),
        "train_native_base": int(native_base + optimizer),
        "train_dequantized_base": int(dequantized_base + optimizer),
        "trainable_optimizer_state": optimizer,
        # offline distillation: precompute-teacher's cache on disk at its default --top-k
        "teacher_cache_per_1m_tokens": bytes_per_token(TEACHER_TOP_K) * 1_000_000,
    }
    device_plan = None
    if devices is not None or device_memory is not None:
        forms = {"native": (native_layers, chunk)}
        if quantization:
            forms["dequantized"] = (dequantized_layers, 0)
        device_plan = plan_devices(devices or 1, device_memory, forms, shared_by_layer, optimizer)
    return Plan(model_type=config.model_type, num_layers=int(config.num_hidden_layers),
                moe_layers=[b.layer for b in blocks], num_experts=layout.num_experts, routed_top_k=top_k,
                hidden_size=layout.hidden_size, expert_intermediate_size=layout.intermediate_size,
                total_params=total, active_params_per_token=active, expert_params_per_expert=per_expert,
                shared_params_per_layer=shared_per_layer, shared_params_total=shared_total,
                width_multiplier=check_width(width_multiplier), quantization=quantization, adapter_bytes=adapter,
                memory_bytes=memory, devices=device_plan, dtype=_dtype_name(loaded), dtype_source=source,
                dequantized_dtype=_dtype_name(dequantized_dtype),
                raw_sample=raw_sample_plan(len(blocks), layout.num_experts, layout.hidden_size, keep_raw,
                                           keep_hidden, devices or 1, loaded.itemsize) if keep_raw else None)


def plan_devices(devices: int, device_memory: float | None, forms: dict, shared_by_layer: dict,
                 optimizer: int) -> DevicePlan:
    """Per-rank memory on `devices` devices of `device_memory` GiB, replicated and sharded.

    `forms` maps a base form to (bytes per decoder layer, key None for the rest; decode chunk bytes);
    `shared_by_layer` is the shared expert's parameters per MoE layer; `optimizer` the bytes of all
    trainable weights, grads and AdamW moments.
    """
    memory = None if device_memory is None else int(device_memory * GIB)
    rows, verdicts, largest = [], {}, {}
    for form, (layers, chunk) in forms.items():
        weights = sum(layers.values())
        decoder = {k: v for k, v in layers.items() if k is not None}
        largest[form] = int(max(decoder.values()))
        if form == "native":
            largest_layer = max(decoder, key=decoder.get)
        for stage in ("train", "base"):
            trainable = optimizer if stage == "train" else 0
            per_param = TRAINABLE_GATHERED_BYTES_PER_PARAM if stage == "train" else 0
            # the root unit (embeddings, final norm, LM head) stays gathered from its forward to the end of backward
            gathered = 2 * max(b + per_param * shared_by_layer.get(k, 0) for k, b in decoder.items()) + \
                layers.get(None, 0)
            for layout, parts in (("replicated", (weights, 0, trainable)),
                                  ("sharded", (weights / devices, gathered, trainable / devices))):
                base, gathered_bytes, trainable_bytes = (math.ceil(x) for x in parts)
                total = base + gathered_bytes + trainable_bytes + chunk
                rows.append(RankMemory(stage, form, layout, base, gathered_bytes, trainable_bytes, chunk, total,
                                       None if memory is None else total <= memory))
            if memory is not None:
                fits = [r.layout for r in rows[-2:] if r.fits]
                verdicts[f"{stage}/{form}"] = fits[0] if fits else "does not fit"
    return DevicePlan(devices=devices, device_memory_bytes=memory, largest_layer=largest_layer,
                      largest_layer_bytes=largest, per_rank=rows, verdicts=verdicts)


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
        ("base weights dtype (non-quantized)", f"{plan.dtype} ({plan.dtype_source})"),
        ("shared experts total (trainable)",
         f"{_n(plan.shared_params_total)} ({100 * plan.shared_params_total / plan.total_params:.2f}% of total)"),
        ("adapter on disk (fp32)", format_bytes(plan.adapter_bytes)),
    ]
    mem = plan.memory_bytes
    native = (f"as loaded ({plan.quantization} experts kept packed, the rest {plan.dtype})" if plan.quantization
              else f"as loaded ({plan.dtype})")
    mem_rows = [
        ("convert, streaming from disk", mem["convert_streaming"]),
        (f"base {native}", mem["base_native"]),
        ("  = collect, validate, chat, precompute-teacher, convert check", mem["base_native"]),
        ("  train (+ shared experts, grads, AdamW)", mem["train_native_base"]),
    ]
    if plan.quantization:
        mem_rows += [
            (f"base dequantized to {plan.dequantized_dtype} (--dequantize)", mem["base_dequantized"]),
            ("  train (+ shared experts, grads, AdamW)", mem["train_dequantized_base"]),
        ]
    mem_rows += [
        ("trainable weights+grads+AdamW", mem["trainable_optimizer_state"]),
        (f"teacher cache per 1 M tokens (--top-k {TEACHER_TOP_K}, on disk)", mem["teacher_cache_per_1m_tokens"]),
    ]
    width = max(len(k) for k, _ in rows + mem_rows) + 2
    out = [f"{k:<{width}}{v}" for k, v in rows]
    out.append("")
    out.append("memory per process (weights and optimizer state; activations come on top; with --use-ddp "
               "every rank holds all of it)")
    out += [f"{k:<{width}}{v / GIB:8.2f} GiB" for k, v in mem_rows]
    out.append("online distillation reuses the frozen base as teacher (shared experts switched off): "
               "no second copy of the model")
    if plan.raw_sample is not None:
        out += ["", *format_raw_sample(plan.raw_sample, width)]
    if plan.devices is not None:
        out += ["", *format_devices(plan.devices)]
    return "\n".join(out)


def format_raw_sample(r: dict, width: int) -> list[str]:
    """The lines of `nexus plan --keep-raw N [--keep-hidden]`: what collect's raw sample costs, where."""
    what = "probabilities and hidden states" if r["hidden"] else "probabilities"
    rows = [("on each collecting device", r["device_bytes"]),
            ("  + at each flush, one layer from every rank", r["flush_gathered_bytes"]),
            ("host memory of the main rank at a flush", r["flush_host_bytes"]),
            ("on disk (<stats>.raw.safetensors)", r["disk_bytes"])]
    flags = f"--keep-raw {r['tokens_per_layer']}" + (" --keep-hidden" if r["hidden"] else "")
    return [f"collect {flags}: raw sample of {r['tokens_per_layer']:,} tokens per MoE layer ({what})",
            *(f"{k:<{width}}{v / GIB:8.2f} GiB" for k, v in rows)]


VERDICTS = {"replicated": "fits replicated", "sharded": "fits sharded only", "does not fit": "does not fit"}


def format_devices(d: DevicePlan) -> list[str]:
    """The per-rank table of `nexus plan --devices N [--device-memory GB]`, as lines."""
    of = "" if d.device_memory_bytes is None else f" of {d.device_memory_bytes / GIB:.2f} GiB"
    sizes = ", ".join(f"{v / GIB:.2f} GiB {'as loaded' if k == 'native' else 'dequantized'}"
                      for k, v in d.largest_layer_bytes.items())
    out = [f"memory per rank on {d.devices} device{'s' if d.devices > 1 else ''}{of} (weights and optimizer "
           "state; activations come on top)",
           "  replicated (as train --use-ddp): every rank holds the whole base and all trainable state",
           "  sharded (--shard-base): FSDP2, one unit per decoder layer; each rank holds 1/N of the base and of",
           "    the trainable state (shared experts' fp32 weights, grads, AdamW), plus the gathered layers",
           "  gathered: the largest decoder layer unsharded, twice (in use + prefetched), in train with its",
           f"    shared expert's fp32 weights and gradient (that layer: {sizes}); plus the root",
           "    (embeddings, final norm, LM head), gathered from the forward until the backward ends"]
    if any(r.decode_chunk_bytes for r in d.per_rank):
        out.append("  chunk: routed experts dequantized a chunk at a time (the quantized base kept packed)")
    out.append(f"{'GiB per rank':<16}{'base':>8} {'gathered':>9} {'trainable':>9} {'chunk':>6} {'total':>8}"
               + ("  fits" if d.device_memory_bytes is not None else ""))
    for r in d.per_rank:
        if r.layout == "replicated":
            name = ("train" if r.stage == "train" else BASE_STAGES) + (" --dequantize" * (r.base_form != "native"))
            verdict = d.verdicts.get(f"{r.stage}/{r.base_form}")
            out.append(name + (f": {VERDICTS[verdict]}" if verdict else ""))
        cells = (r.base_bytes, r.gathered_layers_bytes, r.trainable_bytes, r.decode_chunk_bytes, r.total_bytes)
        out.append(f"  {r.layout:<14}" + " ".join(f"{v / GIB:{w}.2f}" for v, w in zip(cells, (8, 9, 9, 6, 8)))
                   + ("" if r.fits is None else f"  {'yes' if r.fits else 'no'}"))
    return out
