"""Capturing what the routers compute, for statistics, router losses and validation.

Every router on the unified interface returns `(router_logits, top_k_weights, top_k_index)` for the
flattened tokens of the batch: logits (T, E) over all experts, then the routing weights (T, k) the
selected experts actually receive and their indices (T, k). Probabilities are taken as softmax over
all experts of the logits (never a softmax of the already-sparse top-k weights). A router that
returns probabilities instead (Gemma 4; `nexus.families` says which) is passed on as log-probabilities,
which are logits of the same distribution, so nothing downstream softmaxes probabilities. The output
is checked on every call and a router that returns something else is refused by name. T = B × L in
row-major order, so a (B, L) attention mask flattened the same way selects the real tokens.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from .errors import NexusError
from .families import ROUTER_PROBABILITIES
from .moe import MoEBlock, find_moe_blocks

RouterFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]

# Config fields holding the experts routed per token, across transformers' MoE families (5.24):
# num_experts_per_tok (most; an alias of moe_k / moe_topk in ERNIE-4.5-MoE and Hunyuan-MoE),
# experts_per_token (older GPT-OSS configs), moe_topk (Aria), top_k_experts (Gemma 4).
TOP_K_FIELDS = ("num_experts_per_tok", "experts_per_token", "moe_topk", "top_k_experts")


def routed_top_k(config) -> int:
    """Experts routed per token, from a transformers config; a config that does not say is an error."""
    for name in TOP_K_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    raise NexusError(f"model type '{getattr(config, 'model_type', '?')}': its config names no number of experts "
                     f"routed per token (looked for {', '.join(TOP_K_FIELDS)})")


def router_output(b: MoEBlock, output) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits (T, E), weights (T, k), indices (T, k)) from what `b`'s router returned, checked.

    Raises `NexusError` naming the model type when the router returns something else.
    """
    e = b.layout.num_experts
    parts = tuple(output) if isinstance(output, (tuple, list)) else (output,)
    ok = len(parts) >= 3 and all(isinstance(t, torch.Tensor) for t in parts[:3])
    if ok:
        scores, weights, indices = parts[:3]
        ok = (scores.dim() == 2 and scores.shape[-1] == e and scores.is_floating_point()
              and weights.dim() == 2 and tuple(indices.shape) == tuple(weights.shape)
              and weights.shape[0] == scores.shape[0] and not indices.is_floating_point())
    if not ok:
        shapes = [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in parts]
        raise NexusError(f"model type '{b.model_type}': the router of {b.path} returns {shapes}, not "
                         f"(logits [T, {e}], weights [T, k], indices [T, k]); NEXUS cannot read its routing")
    if b.router_returns == ROUTER_PROBABILITIES:  # log p: logits whose softmax is p again
        scores = torch.log(scores.float().clamp_min(torch.finfo(torch.float32).tiny))
    return scores, weights, indices


@contextlib.contextmanager
def router_hooks(model: nn.Module, fn: RouterFn, blocks: list[MoEBlock] | None = None) -> Iterator[list[MoEBlock]]:
    """Call `fn(layer, logits (T, E), weights (T, k), indices (T, k))` on every router forward.

    Tensors are passed as produced (not detached), so router losses can backpropagate through them.
    """
    blocks = find_moe_blocks(model) if blocks is None else blocks
    for b in blocks:
        if b.router is None:
            raise NexusError(f"model type '{b.model_type}': no router found in {b.path} (looked for a child whose "
                             f"weight is [{b.layout.num_experts}, hidden]); NEXUS cannot read its routing")
    handles = []
    for b in blocks:
        def hook(module, args, output, b=b):
            fn(b.layer, *router_output(b, output))

        handles.append(b.router.register_forward_hook(hook))
    try:
        yield blocks
    finally:
        for h in handles:
            h.remove()


def router_probs(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over all experts, in fp32. (T, E) -> (T, E)."""
    return torch.softmax(logits.float(), dim=-1)


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of each row. (T, E) -> (T,)."""
    return -(probs * torch.log(probs.clamp_min(1e-30))).sum(-1)
