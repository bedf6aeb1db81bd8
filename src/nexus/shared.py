"""The shared expert: one always-active expert added to every MoE block.

The shared expert is an instance of the family's own experts class holding a single expert, so it
computes with the same math (GPT-OSS's clamped SwiGLU, biases), the same weight layout and the same
experts kernels as the routed experts. It is registered as `<block>.nexus_shared_expert`, and a
forward hook on the block adds its output to the block's output (keeping the block's return type:
GPT-OSS returns a tuple). Base parameter names do not change. The model records what was attached
as `model.nexus_config` (a `nexus.config.NexusConfig`).

Where `nexus.families` says so (Gemma 4's decoder-layer MoE, latent MoE), the hook sits on the experts
module instead: the shared expert reads exactly what the routed experts read and its output joins
theirs, before whatever the layer does next (a norm, a projection back from the latent width). The
shared expert is still registered on the block, so adapter keys keep the `<block>.nexus_shared_expert`
form.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from .config import NexusConfig
from .errors import NexusError
from .moe import MoEBlock, check_experts_input, check_width, experts_class_for, find_moe_blocks, shared_intermediate_size

SHARED_NAME = "nexus_shared_expert"
GATE_NAME = "nexus_gate"  # optional learnable scalar on the shared expert: output × gate
INIT_STRATEGIES = ("zero", "random")


def build_shared_expert(block: MoEBlock, model: nn.Module, width_multiplier: float = 1,
                        dtype: torch.dtype = torch.float32, device=None,
                        intermediate_size: int | None = None) -> nn.Module:
    """An experts module of the block's family with one expert of width `width_multiplier` × I
    (`shared_intermediate_size`; `intermediate_size` sets it directly, as a saved adapter records it).

    Built on the meta device from the model config, then given fresh [1, ...] parameters, so the
    family's __init__ (and the flags its decorator sets) are used unchanged. Parameters are
    uninitialized; callers initialize them.
    """
    check_width(width_multiplier)
    cls = experts_class_for(block.experts, model)
    with torch.device("meta"):
        shared = cls(model.config)
    layout = block.layout
    inter = intermediate_size or shared_intermediate_size(layout.intermediate_size, width_multiplier)
    if device is None:
        device = next((p.device for p in block.block.parameters() if p.device.type != "meta"), torch.device("cpu"))
    shapes = layout.param_shapes(1, inter)
    for name, param in list(shared.named_parameters(recurse=False)):
        if name not in shapes:
            raise NexusError(f"{cls.__name__}.{name}: per-expert parameter NEXUS does not know how to size")
    for name, shape in shapes.items():
        setattr(shared, name, nn.Parameter(torch.empty(shape, dtype=dtype, device=device)))
    shared.num_experts = 1
    for attr in ("intermediate_size", "intermediate_dim", "expert_dim"):
        if hasattr(shared, attr):
            setattr(shared, attr, inter)
    return shared


def run_shared_expert(shared: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """Apply the one-expert module to every token. (..., H) -> (..., H), in the input's dtype."""
    weight = shared.down_proj
    flat = hidden_states.reshape(-1, hidden_states.shape[-1]).to(weight.dtype)  # (T, H)
    index = torch.zeros(flat.shape[0], 1, dtype=torch.long, device=flat.device)  # (T, 1): expert 0
    weights = torch.ones(flat.shape[0], 1, dtype=weight.dtype, device=flat.device)  # (T, 1)
    out = shared(flat, index, weights)  # (T, H)
    gate = getattr(shared, GATE_NAME, None)
    if gate is not None:
        out = out * gate
    return out.to(hidden_states.dtype).reshape(hidden_states.shape)


def _hooks(b: MoEBlock):
    """(experts pre-hook, output hook) that run `b`'s shared expert on what the hooked module receives.

    On a block, the experts' input is recorded and checked to be the block's input on every forward.
    """
    owner = b.block  # holds the shared expert and the switches (_nexus_enabled, _nexus_record)

    def experts_seen(module, args, kwargs):
        owner._nexus_experts_input = args[0] if args else kwargs["hidden_states"]

    def add_shared(module, args, kwargs, output):
        x = args[0] if args else kwargs["hidden_states"]
        seen = owner.__dict__.pop("_nexus_experts_input", None)
        if not getattr(owner, "_nexus_enabled", True):
            return output
        if seen is not None and module is owner:
            check_experts_input(b, x, seen)
        shared_out = run_shared_expert(getattr(owner, SHARED_NAME), x)
        recorder = getattr(owner, "_nexus_record", None)
        if isinstance(output, tuple):
            routed = output[0]
            output = (routed + shared_out,) + tuple(output[1:])
        else:
            routed = output
            output = routed + shared_out
        if recorder is not None:
            recorder(routed.detach(), shared_out.detach())
        return output

    return experts_seen, add_shared


def init_shared_expert(shared: nn.Module, strategy: str = "zero", std: float = 0.02,
                       tensors: Mapping[str, torch.Tensor] | None = None, scale: float = 1.0,
                       generator: torch.Generator | None = None) -> None:
    """Initialize a shared expert in place.

    `zero`: all zeros (the model computes exactly what the base computes). `random`: weights
    normal(0, std) and biases zero, as the family's own init does. `tensors`: copy the given
    tensors (name -> [1, ...] tensor, e.g. built by `convert`); then `scale` multiplies the
    output projection (and its bias), i.e. the expert's output.
    """
    with torch.no_grad():
        if tensors is not None:
            own = dict(shared.named_parameters(recurse=False))
            missing = sorted(n for n in own if n != GATE_NAME and n not in tensors)
            if missing:
                raise NexusError(f"shared-expert init tensors lack {missing}")
            for name, t in tensors.items():
                if name not in own:
                    raise NexusError(f"shared-expert init tensor '{name}' is not a parameter of {type(shared).__name__}")
                if tuple(t.shape) != tuple(own[name].shape):
                    raise NexusError(f"shared-expert init tensor '{name}' has shape {tuple(t.shape)}, "
                                     f"expected {tuple(own[name].shape)}")
                own[name].copy_(t)
        elif strategy == "zero":
            for name, p in shared.named_parameters(recurse=False):
                if name != GATE_NAME:
                    p.zero_()
        elif strategy == "random":
            for name, p in shared.named_parameters(recurse=False):
                if name == GATE_NAME:
                    continue
                if name.endswith("_bias"):
                    p.zero_()
                else:  # drawn on the CPU so a seed gives the same weights on any device
                    p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float32) * std)
        else:
            raise NexusError(f"unknown init strategy '{strategy}' (expected one of {', '.join(INIT_STRATEGIES)})")
        if scale != 1.0:
            shared.down_proj.mul_(scale)
            if hasattr(shared, "down_proj_bias"):
                shared.down_proj_bias.mul_(scale)


def attach_shared_experts(model: nn.Module, init: str = "zero", width_multiplier: float = 1,
                          gate: bool | float | None = False, trainable_router: bool = False,
                          dtype: torch.dtype = torch.float32, seed: int | None = None,
                          tensors: Mapping[int, Mapping[str, torch.Tensor]] | None = None,
                          scale: float = 1.0, intermediate_size: int | None = None) -> nn.Module:
    """Add a trainable shared expert to every MoE block of `model`, in place; returns `model`.

    Args:
        init: "zero" (outputs unchanged) or "random" (normal with the config's initializer_range).
        width_multiplier: shared intermediate size = width_multiplier × the routed expert's; a fraction
            (0.25) is rounded to the family's alignment (`nexus.moe.shared_intermediate_size`).
        intermediate_size: the shared intermediate size itself (overrides width_multiplier's rounding).
        gate: add a learnable scalar gate on the shared output, initialized to 1 (True) or to this value
            (e.g. 0.1: the shared expert's contribution starts small); False or None: no gate.
        trainable_router: leave the routers trainable (everything else original stays frozen).
        dtype: dtype of the trainable weights (fp32 by default, even over a bf16 base).
        tensors: {layer index: {param name: [1, ...] tensor}} to copy in instead of `init`.
        scale: multiplies each shared expert's output at init.

    What was attached is recorded as `model.nexus_config`.
    """
    if getattr(model, "nexus_config", None) is not None:
        raise NexusError("this model already has NEXUS shared experts attached")
    gate_init = None if gate is False or gate is None else 1.0 if gate is True else float(gate)
    if gate_init is not None and not math.isfinite(gate_init):
        raise NexusError(f"gate must be a finite number, got {gate}")
    blocks = find_moe_blocks(model)
    std = float(getattr(model.config, "initializer_range", 0.02))
    generator = None
    if seed is not None:
        generator = torch.Generator(device="cpu").manual_seed(seed)
    for p in model.parameters():
        p.requires_grad_(False)
    inter = None
    for b in blocks:
        shared = build_shared_expert(b, model, width_multiplier, dtype=dtype, intermediate_size=intermediate_size)
        if gate_init is not None:
            setattr(shared, GATE_NAME, nn.Parameter(torch.full((), gate_init, dtype=dtype,
                                                               device=shared.down_proj.device)))
        layer_tensors = None if tensors is None else tensors.get(b.layer)
        if tensors is not None and layer_tensors is None:
            raise NexusError(f"no shared-expert tensors given for MoE layer {b.layer}")
        init_shared_expert(shared, init, std, layer_tensors, scale, generator)
        b.block.add_module(SHARED_NAME, shared)
        experts_seen, add_shared = _hooks(b)
        b.hooked.register_forward_hook(add_shared, with_kwargs=True)
        if b.hooked is b.block:
            b.experts.register_forward_pre_hook(experts_seen, with_kwargs=True)
        for p in shared.parameters():
            p.requires_grad_(True)
        if trainable_router:
            if b.router is None:
                raise NexusError(f"{b.path}: no router found to make trainable")
            for p in b.router.parameters():
                p.requires_grad_(True)
        inter = shared.down_proj.shape[1 if b.layout.is_transposed else 2]
    model.nexus_config = NexusConfig(
        base_model_name_or_path=getattr(model.config, "_name_or_path", None) or "",
        model_type=getattr(model.config, "model_type", None), moe_layers=tuple(b.layer for b in blocks),
        num_experts=blocks[0].layout.num_experts, intermediate_size=int(inter),
        width_multiplier=check_width(width_multiplier), init_strategy=init if tensors is None else "tensors",
        gate=gate_init is not None, trainable_router=bool(trainable_router), scale=float(scale))
    return model


def shared_expert_modules(model: nn.Module) -> dict[str, nn.Module]:
    """{block path: shared expert} of a model with shared experts attached."""
    out = {}
    for path, module in model.named_modules():
        shared = getattr(module, SHARED_NAME, None)
        if isinstance(shared, nn.Module) and path + "." + SHARED_NAME not in out:
            out[path] = shared
    if not out:
        raise NexusError("model has no NEXUS shared experts attached")
    return out


@contextlib.contextmanager
def shared_experts_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run `model` as the unmodified base: the shared experts are skipped inside the block.

    This is how the teacher is computed in online distillation without a second copy of the base.
    """
    blocks = [m for m in model.modules() if hasattr(m, SHARED_NAME)]
    for m in blocks:
        m._nexus_enabled = False
    try:
        yield model
    finally:
        for m in blocks:
            m._nexus_enabled = True


@contextlib.contextmanager
def recording_shared_output(block: nn.Module, record) -> Iterator[nn.Module]:
    """Call `record(routed, shared)` (both detached, the block's output shape) on each forward of an
    MoE block with a shared expert, while inside the context (validate's output-ratio metric)."""
    previous = getattr(block, "_nexus_record", None)
    block._nexus_record = record
    try:
        yield block
    finally:
        block._nexus_record = previous


def parameter_summary(model: nn.Module) -> dict[str, int]:
    """Counts of trainable and total parameters (each tensor once; packed quantized experts count the
    weights they hold, not their bytes)."""
    seen, total, trainable = set(), 0, 0
    for m in model.modules():
        projections = getattr(m, "nexus_projections", None)
        if projections is not None:
            total += sum(m.num_experts * o * i for o, i in projections.values())
            for name in projections:
                seen.update(id(p) for p in m.nexus_packed(name))
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return {"trainable": trainable, "total": total}


def format_parameter_summary(model: nn.Module) -> str:
    s = parameter_summary(model)
    pct = 100.0 * s["trainable"] / max(1, s["total"])
    return f"trainable params: {s['trainable']:,} || all params: {s['total']:,} || trainable%: {pct:.4f}"
