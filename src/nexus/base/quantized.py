"""Frozen routed experts kept in their checkpoint's quantized form, with correct input gradients.

    experts = quantize_experts(model.model.layers[3].mlp.experts, MXFP4)   # a meta-device family module
    # ... the loader fills experts.gate_up_proj_blocks / _scales, down_proj_blocks / _scales, biases ...
    out = experts(hidden_states, top_k_index, top_k_weights)           # (T, H), differentiable in hidden_states

The module is the family's own experts class (its `_apply_gate`, activation, flags and biases are
used unchanged) with each weight projection replaced by the packed bytes the checkpoint stores:

- MXFP4 (gpt-oss): `<proj>_blocks` uint8 [E, out, in/32, 16], `<proj>_scales` uint8 [E, out, in/32];
- fine-grained FP8 (DeepSeek-V3, Qwen3-*-FP8): `<proj>` float8_e4m3fn [E, out, in] and
  `<proj>_scale_inv` float32 [E, ceil(out/bo), ceil(in/bi)] for a (bo, bi) block.

Each projection runs through `QuantizedGroupedLinear`, a `torch.autograd.Function`: tokens come
sorted by expert, only the experts the batch routes to are dequantized, a bounded chunk of them at
a time, and the backward dequantizes them again to return the gradient with respect to the input
(the weights are frozen: no weight gradient). Nothing dequantized is kept between forward and
backward; what the function saves is a reference to the packed bytes and the routing counts.
Biases, the gated activation and the routing weights stay in ordinary autograd.

transformers' hub kernels (`kernels`, Triton `matmul_ogs`) are never used: they are fetched at load
time and their forward has no backward.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import NexusError
from . import mxfp4
from .cpu_matmul import fp32_products

# Largest dequantized weight chunk a projection holds at once (bytes of the compute dtype). Bounds
# the working set: gpt-oss-120b's gate_up expert is 33 MB in bf16, so a chunk is ~8 experts.
CHUNK_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class Codec:
    """How one projection's packed tensors decode to an [n, out, in] weight."""

    name: str  # "mxfp4" or "fp8"
    suffixes: tuple[str, ...]  # names of the packed tensors: parameter name + suffix
    block: tuple[int, int] | None = None  # FP8 (out, in) block of one scale

    def packed_shapes(self, out_features: int, in_features: int, num_experts: int) -> dict[str, tuple[int, ...]]:
        """Shapes of the packed tensors of an [E, out, in] projection, by suffix."""
        e = num_experts
        if self.name == "mxfp4":
            if in_features % mxfp4.BLOCK_SIZE:
                raise NexusError(f"MXFP4 needs the input size ({in_features}) to be a multiple of {mxfp4.BLOCK_SIZE}")
            g = in_features // mxfp4.BLOCK_SIZE
            return {"_blocks": (e, out_features, g, mxfp4.BYTES_PER_BLOCK), "_scales": (e, out_features, g)}
        bo, bi = self.block
        return {"": (e, out_features, in_features),
                "_scale_inv": (e, math.ceil(out_features / bo), math.ceil(in_features / bi))}

    def packed_dtypes(self) -> dict[str, torch.dtype]:
        if self.name == "mxfp4":
            return {"_blocks": torch.uint8, "_scales": torch.uint8}
        return {"": torch.float8_e4m3fn, "_scale_inv": torch.float32}

    def decode(self, packed: tuple[torch.Tensor, ...], dtype: torch.dtype,
               out: torch.Tensor | None = None) -> torch.Tensor:
        """Packed tensors of n experts (in `suffixes` order) -> weight [n, out, in] in `dtype`.

        `out`, a contiguous buffer of exactly that many elements, receives the values when given."""
        if self.name == "mxfp4":
            blocks, scales = packed
            return mxfp4.decode(blocks, scales, dtype, out=out)
        from . import fp8

        weight, scale_inv = packed
        return fp8.decode(weight, scale_inv, self.block, dtype, out=out)


MXFP4 = Codec("mxfp4", ("_blocks", "_scales"))


def fp8_codec(block_size) -> Codec:
    """The fine-grained FP8 codec for a `quantization_config.weight_block_size` of [out, in]."""
    try:
        bo, bi = (int(b) for b in block_size)
    except (TypeError, ValueError):
        raise NexusError(f"FP8 weight_block_size must be [rows, cols], got {block_size!r}") from None
    return Codec("fp8", ("", "_scale_inv"), (bo, bi))


def _chunks(counts: list[int], nbytes_per_expert: int, limit: int | None = None):
    """Consecutive runs of routed experts whose dequantized weights fit `limit` (default `CHUNK_BYTES`):
    (experts, row start, row end)."""
    per_chunk = max(1, (CHUNK_BYTES if limit is None else limit) // max(1, nbytes_per_expert))
    run, start, row = [], 0, 0
    for expert, n in enumerate(counts):
        if n == 0:
            continue
        if not run:
            start = row
        run.append(expert)
        row += n
        if len(run) == per_chunk:
            yield run, start, row
            run = []
    if run:
        yield run, start, row


def _grouped(x: torch.Tensor, codec: Codec, packed: tuple[torch.Tensor, ...], counts: list[int],
             transpose: bool, out_features: int) -> torch.Tensor:
    """Rows of `x` (sorted by expert, `counts` per expert) times each expert's weight.

    transpose=False: y = x @ W.T (forward, x (S, in) -> (S, out)); True: y = x @ W (backward, (S, out) -> (S, in)).
    The weights decode to the input's dtype and multiply in it, except for bf16/fp16 on a CPU without a
    fast GEMM for it (`cpu_matmul.fp32_products`): there they decode to fp32, multiply in fp32, and
    the product is cast back to the input's dtype.
    """
    in_dtype = x.dtype
    dtype = torch.float32 if fp32_products(in_dtype, x.device) else in_dtype
    x = x.to(dtype)
    y = x.new_zeros(x.shape[0], out_features)
    w_out, w_in = (x.shape[1], out_features) if transpose else (out_features, x.shape[1])
    per_expert = w_out * w_in * dtype.itemsize
    for experts, start, _ in _chunks(counts, per_expert):
        if experts[-1] - experts[0] == len(experts) - 1:  # consecutive experts: a view of the packed bytes
            chunk = tuple(p[experts[0]:experts[-1] + 1] for p in packed)
        else:
            index = torch.tensor(experts, device=packed[0].device)
            chunk = tuple(p.index_select(0, index) for p in packed)
        buffer = _workspace(len(experts) * w_out * w_in, dtype, x.device)
        weight = codec.decode(chunk, dtype, out=buffer).view(len(experts), w_out, w_in)  # (n, out, in)
        row = start
        for j, expert in enumerate(experts):
            end = row + counts[expert]
            w = weight[j] if transpose else weight[j].T
            torch.mm(x[row:end], w, out=y[row:end])
            row = end
        del weight
    return y.to(in_dtype)


_WORKSPACE = threading.local()


def _workspace(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """This thread's reusable CPU buffer for decoded chunks (at most one chunk: `CHUNK_BYTES`, or one expert
    if larger), grown as needed and kept. A fresh buffer per chunk costs more than the decode on CPU: every
    page of it faults in. None on other devices, whose caching allocators already reuse memory."""
    if device.type != "cpu":
        return None
    buf = getattr(_WORKSPACE, "buffer", None)
    if buf is None or buf.dtype != dtype or buf.numel() < numel:
        _WORKSPACE.buffer = None  # let the old one go before allocating the new one
        buf = _WORKSPACE.buffer = torch.empty(numel, dtype=dtype)
    return buf[:numel]


class QuantizedGroupedLinear(torch.autograd.Function):
    """y[rows of expert e] = x[rows of expert e] @ dequant(W_e).T, with dx only (frozen weights).

    x: (S, in) sorted by expert; counts: tokens per expert (a list, length E); packed: the
    projection's packed tensors, indexed by expert along dim 0. Rows past sum(counts) stay zero.
    """

    @staticmethod
    def forward(ctx, x, codec, counts, out_features, *packed):
        ctx.codec, ctx.counts, ctx.in_features = codec, counts, x.shape[1]
        ctx.packed = packed  # references to the frozen bytes, not copies; not saved activations
        return _grouped(x, codec, packed, counts, transpose=False, out_features=out_features)

    @staticmethod
    def backward(ctx, grad):
        dx = None
        if ctx.needs_input_grad[0]:
            dx = _grouped(grad.contiguous(), ctx.codec, ctx.packed, ctx.counts, transpose=True,
                          out_features=ctx.in_features)
        return (dx, None, None, None) + (None,) * len(ctx.packed)


class QuantizedExpertsMixin:
    """Forward of a family experts module whose weight projections are packed (see module docstring).

    Put in front of the family's class by `quantize_experts`; `_apply_gate`, `act_fn`, biases and
    flags are the family's own.
    """

    nexus_codec: Codec
    nexus_family_class: type
    nexus_projections: dict  # projection name -> (out_features, in_features)

    def nexus_packed(self, proj: str) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, proj + s) for s in self.nexus_codec.suffixes)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        """(T, H) tokens, (T, k) expert indices and routing weights -> (T, H) weighted expert sum."""
        num_tokens, top_k = top_k_index.shape
        expert_ids = top_k_index.reshape(-1)  # (S,), S = T·k
        order = torch.argsort(expert_ids, stable=True)  # (S,) token-expert pairs grouped by expert
        ids_sorted = expert_ids[order]
        # one host sync per layer: the per-expert row counts decide which experts to dequantize
        counts = torch.bincount(ids_sorted.clamp(max=self.num_experts), minlength=self.num_experts + 1)
        counts = counts[: self.num_experts].tolist()  # ids >= E (masked slots) sort last and stay zero
        valid = (ids_sorted < self.num_experts).unsqueeze(-1)
        ids_clamped = ids_sorted.clamp(max=self.num_experts - 1)
        x = hidden_states[order // top_k]  # (S, H)
        up_name = "gate_up_proj" if self.has_gate else "up_proj"
        h = self._project(up_name, x, counts)  # (S, 2I) or (S, I)
        if self.has_bias:
            h = h + getattr(self, up_name + "_bias")[ids_clamped].to(h.dtype)
        h = self._apply_gate(h) if self.has_gate else self.act_fn(h)  # (S, I)
        out = self._project("down_proj", h, counts)  # (S, H)
        if self.has_bias:
            out = out + self.down_proj_bias[ids_clamped].to(out.dtype)
        if getattr(self, "has_post_expert_norm", False):
            out = self.post_expert_norm(out)
        weights = top_k_weights.reshape(-1)[order].unsqueeze(-1)  # (S, 1)
        out = torch.where(valid, out * weights.to(out.dtype), 0.0)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        # back to (T, k, H) and summed in fp32 for a deterministic, stable reduction (as transformers does)
        total = out[inverse].view(num_tokens, top_k, -1).float().sum(dim=1)
        return total.to(hidden_states.dtype)

    def _project(self, proj: str, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        out_features, _ = self.nexus_projections[proj]
        return QuantizedGroupedLinear.apply(x.contiguous(), self.nexus_codec, counts, out_features,
                                            *self.nexus_packed(proj))

    def dequantized_weight(self, proj: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The projection as the family's parameter would hold it ([E, out, in], or [E, in, out] when
        the family is transposed). For tests and inspection: this is the full dequantized tensor."""
        w = self.nexus_codec.decode(self.nexus_packed(proj), dtype)
        return w.transpose(1, 2) if self.is_transposed else w

    def extra_repr(self) -> str:
        return f"{self.nexus_codec.name}, experts={self.num_experts}, frozen"


_CLASSES: dict[type, type] = {}


def quantized_class(family_class: type) -> type:
    """`Quantized<Family>`: the family's experts class with the quantized forward in front."""
    if family_class not in _CLASSES:
        _CLASSES[family_class] = type(f"Quantized{family_class.__name__}", (QuantizedExpertsMixin, family_class),
                                      {"__module__": __name__})
    return _CLASSES[family_class]


def is_quantized_experts(module: nn.Module) -> bool:
    return isinstance(module, QuantizedExpertsMixin)


def quantize_experts(experts: nn.Module, codec: Codec, device=None) -> nn.Module:
    """Turn a family experts module (usually on the meta device) into its quantized form, in place.

    The weight projections become frozen packed parameters (allocated empty on `device`, to be filled
    by the loader); biases keep their parameters. Returns the same object, now a `Quantized<Family>`.
    """
    if is_quantized_experts(experts):
        return experts
    family = type(experts)
    if not getattr(experts, "is_concatenated", True) and not getattr(experts, "is_transposed", False) \
            and codec.name != "mxfp4":
        raise NexusError(f"{family.__name__}: interleaved gate/up experts in {codec.name} are not supported")
    projections = {}
    e = int(experts.num_experts)
    for proj in ("gate_up_proj", "up_proj", "down_proj"):
        param = getattr(experts, proj, None)
        if not isinstance(param, nn.Parameter):
            continue
        # the family's parameter is [E, out, in], or [E, in, out] when transposed
        out_f, in_f = (param.shape[2], param.shape[1]) if experts.is_transposed else (param.shape[1], param.shape[2])
        projections[proj] = (int(out_f), int(in_f))
        del experts._parameters[proj]
        shapes, dtypes = codec.packed_shapes(out_f, in_f, e), codec.packed_dtypes()
        for suffix in codec.suffixes:
            t = torch.empty(shapes[suffix], dtype=dtypes[suffix], device=device or param.device)
            experts.register_parameter(proj + suffix, nn.Parameter(t, requires_grad=False))
    if "down_proj" not in projections:
        raise NexusError(f"{family.__name__}: no down_proj parameter; cannot quantize these experts")
    experts.__class__ = quantized_class(family)
    experts.nexus_codec = codec
    experts.nexus_family_class = family
    experts.nexus_projections = projections
    for p in experts.parameters():
        p.requires_grad_(False)
    return experts
