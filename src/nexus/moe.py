"""Finding the MoE blocks of a transformers model, through the unified experts interface.

Every MoE family in transformers 5 keeps its routed experts in one module whose class is wrapped by
`transformers.integrations.moe.use_experts_implementation`: 3-D parameters (`gate_up_proj` or
`up_proj`, `down_proj`, optional `*_bias`), the layout flags `is_transposed`, `is_concatenated`,
`has_bias`, `has_gate`, and its own `_apply_gate`. The module that owns such an experts module is
the MoE block; its router is the sibling whose weight is [num_experts, hidden]. GPT-OSS, Qwen2/3-MoE,
Mixtral, OLMoE, DeepSeek-V3 and any later family on the same interface are found the same way.

The mechanism checks what it assumes instead of guessing: the block is a feed-forward inside a
decoder layer (not the layer itself, whose input is the residual stream), the experts work at the
block's input width (not a latent width), and the block's input is what the experts receive
(checked on every forward, `check_experts_input`). A family that breaks one is served only as
`nexus.families` says, and refused by name otherwise.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass

from torch import nn

from .errors import NexusError
from .families import ATTACH_BLOCK, ATTACH_EXPERTS, ROUTER_LOGITS, family_rule, model_types, refusal

SUPPORTED_FAMILIES = ("gpt_oss", "qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v3", "olmoe")
_INTERFACE_FLAGS = ("has_gate", "is_transposed", "has_bias", "num_experts")
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")
_DECODER_LAYER_RE = re.compile(r"(?:^|\.)layers\.\d+$")


@dataclass(frozen=True)
class ExpertsLayout:
    """Shapes and layout of one experts module (sizes read from its parameters, not guessed)."""

    num_experts: int
    hidden_size: int
    intermediate_size: int
    has_gate: bool
    has_bias: bool
    is_transposed: bool
    is_concatenated: bool

    @property
    def up_name(self) -> str:
        return "gate_up_proj" if self.has_gate else "up_proj"

    def param_shapes(self, num_experts: int, intermediate_size: int) -> dict[str, tuple[int, ...]]:
        """Parameter shapes of an experts module with this layout and the given sizes."""
        e, h, i = num_experts, self.hidden_size, intermediate_size
        up_out = 2 * i if self.has_gate else i
        if self.is_transposed:  # weights stored [E, in, out]
            shapes = {self.up_name: (e, h, up_out), "down_proj": (e, i, h)}
        else:  # weights stored [E, out, in], as nn.Linear
            shapes = {self.up_name: (e, up_out, h), "down_proj": (e, h, i)}
        if self.has_bias:
            shapes[f"{self.up_name}_bias"] = (e, up_out)
            shapes["down_proj_bias"] = (e, h)
        return shapes

    def expert_numel(self, intermediate_size: int | None = None) -> int:
        """Parameters of one expert (at `intermediate_size`, default this layout's)."""
        i = self.intermediate_size if intermediate_size is None else intermediate_size
        total = 0
        for shape in self.param_shapes(1, i).values():
            n = 1
            for d in shape:
                n *= d
            total += n
        return total


MAX_WIDTH_ALIGNMENT = 64  # a fractional-width shared expert's size is a multiple of this (or less, see below)


def check_width(width_multiplier, flag: str = "--width-multiplier") -> float:
    """A positive, finite width multiplier (fractions such as 0.25 allowed)."""
    try:
        w = float(width_multiplier)
    except (TypeError, ValueError):
        raise NexusError(f"{flag} must be a positive number, got {width_multiplier!r}") from None
    if not (w > 0 and w < float("inf")):
        raise NexusError(f"{flag} must be a positive number, got {width_multiplier!r}")
    return int(w) if w == int(w) else w


def shared_intermediate_size(routed: int, width_multiplier: float) -> int:
    """Hidden units of a shared expert `width_multiplier` times as wide as a routed expert of `routed` units.

    Whole multiples are exact. A fraction is rounded to the family's alignment: the largest power of
    two up to 64 that divides the routed size and does not exceed the unrounded width (gpt-oss 2880
    and DeepSeek-V3 2048 -> 64; a 16-unit test expert at 0.25 -> 4), and is at least one such step:
    0.25 x 2880 = 720 -> 704 (11 x 64).
    """
    w = check_width(width_multiplier)
    if w == int(w):
        return int(w) * routed
    align = 1
    while align < MAX_WIDTH_ALIGNMENT and routed % (align * 2) == 0 and align * 2 <= w * routed:
        align *= 2
    return max(align, int(round(w * routed / align)) * align)


@dataclass
class MoEBlock:
    """One MoE block of a model: where it is and its parts."""

    layer: int  # decoder-layer index
    path: str  # dotted module path, e.g. "model.layers.3.mlp"
    block: nn.Module
    experts: nn.Module
    experts_name: str
    router: nn.Module | None
    router_name: str | None
    layout: ExpertsLayout
    model_type: str = "?"
    attach: str = ATTACH_BLOCK  # nexus.families: where the shared expert reads its input and adds its output
    router_returns: str = ROUTER_LOGITS  # what the router's first output is (nexus.families)

    @property
    def hooked(self) -> nn.Module:
        """The module whose input the shared expert reads and to whose output it adds its own."""
        return self.experts if self.attach == ATTACH_EXPERTS else self.block


def is_experts_module(module: nn.Module) -> bool:
    """True for a module built with `use_experts_implementation` (or a quantized stand-in of one)."""
    if all(hasattr(module, f) for f in _INTERFACE_FLAGS):
        return True
    return type(module).__name__.endswith("Experts") and hasattr(module, "num_experts") and \
        isinstance(getattr(module, "down_proj", None), nn.Parameter)


def experts_class_for(module: nn.Module, model: nn.Module) -> type[nn.Module]:
    """The family's unified experts class for `module`.

    Usually `type(module)`; for NEXUS's quantized experts, the family class they were made from. A
    quantized replacement (e.g. transformers' `Mxfp4GptOssExperts`, which
    holds packed uint8 blocks and is not on the unified interface) maps back to the decorated
    experts class of the model's own modeling module.
    """
    family = getattr(module, "nexus_family_class", None)
    if family is not None:
        return family
    if all(hasattr(module, f) for f in _INTERFACE_FLAGS):
        return type(module)
    modeling = sys.modules.get(type(model).__module__)
    for obj in vars(modeling).values() if modeling else ():
        # The decorator wraps __init__ (functools.wraps leaves __wrapped__) and guarantees _apply_gate.
        if isinstance(obj, type) and issubclass(obj, nn.Module) and hasattr(obj, "_apply_gate") \
                and getattr(obj.__init__, "__wrapped__", None) is not None:
            return obj
    raise NexusError(f"{type(module).__name__}: not on transformers' unified experts interface and no "
                     f"unified experts class found in {type(model).__module__}")


def layout_of(module: nn.Module) -> ExpertsLayout:
    """Read the layout of an experts module from its flags and parameter shapes."""
    projections = getattr(module, "nexus_projections", None)
    if projections is not None:  # NEXUS's quantized experts: logical [out, in] per projection
        up = projections["gate_up_proj" if module.has_gate else "up_proj"]
        return ExpertsLayout(num_experts=int(module.num_experts), hidden_size=up[1],
                             intermediate_size=projections["down_proj"][1], has_gate=module.has_gate,
                             has_bias=module.has_bias, is_transposed=module.is_transposed,
                             is_concatenated=module.is_concatenated)
    has_gate = getattr(module, "has_gate", True)
    has_bias = getattr(module, "has_bias", hasattr(module, "down_proj_bias"))
    is_transposed = getattr(module, "is_transposed", False)
    is_concatenated = getattr(module, "is_concatenated", True)
    if not hasattr(module, "is_transposed"):
        # Quantized stand-in (transformers' Mxfp4GptOssExperts): layout flags from the unified class's
        # decorator defaults, sizes from the module's own attributes (its packed parameters do not have
        # the logical shapes).
        return ExpertsLayout(num_experts=module.num_experts, hidden_size=module.hidden_size,
                             intermediate_size=module.intermediate_size, has_gate=True, has_bias=has_bias,
                             is_transposed=type(module).__name__.startswith("Mxfp4GptOss") or is_transposed,
                             is_concatenated=not type(module).__name__.startswith("Mxfp4GptOss"))
    up = module.gate_up_proj if has_gate else module.up_proj
    down = module.down_proj
    e = up.shape[0]
    if is_transposed:
        hidden, up_out = up.shape[1], up.shape[2]
        inter = down.shape[1]
    else:
        up_out, hidden = up.shape[1], up.shape[2]
        inter = down.shape[2]
    if up_out != (2 * inter if has_gate else inter):
        raise NexusError(f"{type(module).__name__}: unexpected expert shapes {tuple(up.shape)} / {tuple(down.shape)}")
    return ExpertsLayout(num_experts=e, hidden_size=hidden, intermediate_size=inter, has_gate=has_gate,
                         has_bias=has_bias, is_transposed=is_transposed, is_concatenated=is_concatenated)


def _find_router(block: nn.Module, experts_name: str, num_experts: int, hidden: int, named: str | None = None):
    if named is not None:  # the family table names it (its output is checked on every call, nexus.routing)
        child = getattr(block, named, None)
        return (named, child) if isinstance(child, nn.Module) else (None, None)
    for name, child in block.named_children():
        if name == experts_name or name.startswith("nexus_"):
            continue
        w = getattr(child, "weight", None)
        if isinstance(w, nn.Parameter) and w.dim() == 2 and tuple(w.shape) == (num_experts, hidden):
            return name, child
    return None, None


def model_type_of(model: nn.Module) -> str:
    """The model type a message should name: the config's, with its text config's when that differs."""
    config = getattr(model, "config", None)
    types = model_types(config) if config is not None else []
    return " / ".join(types) if types else type(model).__name__


def _text_hidden_size(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    get_text = getattr(config, "get_text_config", None)
    text = get_text() if get_text is not None else config
    hidden = getattr(text, "hidden_size", None)
    return hidden if isinstance(hidden, int) else None


def _check_block(model_type: str, path: str, layout: ExpertsLayout, attach: str, hidden: int | None) -> None:
    """Refuse by name a block whose layout breaks what attaching at the block assumes."""
    if attach == ATTACH_EXPERTS:
        return  # the shared expert reads and writes at the experts module itself: no assumption on the block
    if _DECODER_LAYER_RE.search(path):
        raise NexusError(f"model type '{model_type}': the routed experts sit directly in decoder layer {path}, "
                         f"so its input is the residual stream, not what the experts receive; NEXUS does not "
                         f"support this family")
    if hidden is not None and layout.hidden_size != hidden:
        raise NexusError(f"model type '{model_type}': the experts of {path} work at width {layout.hidden_size} "
                         f"but the block receives hidden_size {hidden} (a latent MoE); NEXUS does not support "
                         f"this family")


def check_experts_input(block: MoEBlock, block_input, experts_input) -> None:
    """Refuse by name when the tensor the routed experts received is not the block's input. (…, H) each."""
    if experts_input is block_input:
        return
    same = experts_input.numel() == block_input.numel() and (
        experts_input.data_ptr() == block_input.data_ptr()
        or bool((experts_input.reshape(-1) == block_input.reshape(-1)).all()))
    if not same:
        raise NexusError(f"model type '{block.model_type}': the experts of {block.path} receive a tensor other than "
                         f"the block's input (shape {tuple(experts_input.shape)} vs {tuple(block_input.shape)}), so "
                         f"a shared expert on the block input would not see what they see; NEXUS does not support "
                         f"this family")


def find_moe_blocks(model: nn.Module) -> list[MoEBlock]:
    """All MoE blocks of `model`, in layer order, with the family's assumptions checked.

    Raises `NexusError` naming the model type if there are none, if the family is refused
    (`nexus.families`), or if a block breaks an assumption NEXUS relies on and the table does not say
    how to serve it.
    """
    config = getattr(model, "config", None)
    model_type = model_type_of(model)
    why = refusal(config) if config is not None else None
    if why is not None:
        raise NexusError(f"model type '{model_type}': {why}; NEXUS does not support this family")
    rule = family_rule(config) if config is not None else None
    attach = rule.attach if rule is not None else ATTACH_BLOCK
    hidden = _text_hidden_size(model)
    blocks = []
    for path, module in model.named_modules():
        if path.endswith("nexus_shared_expert"):
            continue
        for child_name, child in module.named_children():
            if child_name.startswith("nexus_") or not is_experts_module(child):
                continue
            layout = layout_of(child)
            m = _LAYER_RE.search(path)
            if m is None:
                raise NexusError(f"{path}: MoE block outside a `layers.N` list; cannot tell its layer index")
            _check_block(model_type, path, layout, attach, hidden)
            router_name, router = _find_router(module, child_name, layout.num_experts, hidden or layout.hidden_size,
                                               rule.router if rule is not None else None)
            blocks.append(MoEBlock(layer=int(m.group(1)), path=path, block=module, experts=child,
                                   experts_name=child_name, router=router, router_name=router_name,
                                   layout=layout, model_type=model_type, attach=attach,
                                   router_returns=rule.router_returns if rule is not None else ROUTER_LOGITS))
    if not blocks:
        source = getattr(config, "_name_or_path", "")
        raise NexusError(
            f"{source + ': ' if source else ''}model type '{model_type}' has no MoE layers NEXUS can find: it looks "
            f"for experts modules on transformers' unified experts interface. Supported families: "
            f"{', '.join(SUPPORTED_FAMILIES)} (and any other transformers 5 MoE family built on that interface)"
        )
    return sorted(blocks, key=lambda b: b.layer)
