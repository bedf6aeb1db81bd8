"""Running a causal LM as backbone + LM head, and capturing what its routers compute.

Training, the teacher cache and validation never ask the model for its (B, L, V) logits: the backbone
gives the final hidden states and the LM head is applied chunk by chunk (`train.losses.chunked_head_loss`,
`teacher.precompute.teacher_topk`, `validate.metrics.head_sums`), `default_chunk_size` positions at a time. Labels are never
passed to the model, so no auxiliary load-balancing loss can sneak into the objective.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from .errors import NexusError
from .moe import MoEBlock
from .routing import router_hooks


def backbone_of(model: nn.Module) -> nn.Module:
    """The decoder stack of a CausalLM (`model.model` for every supported family)."""
    backbone = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    if not isinstance(backbone, nn.Module) or backbone is model:
        raise NexusError(f"{type(model).__name__}: cannot find its decoder stack (base_model_prefix)")
    return backbone


def lm_head_of(model: nn.Module) -> nn.Linear:
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise NexusError(f"{type(model).__name__}: output embeddings are {type(head).__name__}, expected nn.Linear")
    return head


def vocab_size(model: nn.Module) -> int:
    """Rows of the LM head: the size of the next-token distribution."""
    return int(model.get_output_embeddings().weight.shape[0])


def default_chunk_size(vocab_size: int, budget_elements: int = 1 << 24) -> int:
    """Positions per chunk so that one chunk's fp32 logits hold about `budget_elements` (64 MiB)."""
    return max(1, budget_elements // max(1, vocab_size))


def hidden_states(backbone: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Final hidden states (B, L, H) for right-padded (B, L) ids and mask."""
    out = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state


@torch.no_grad()
def check_head_split(model: nn.Module, device, root: nn.Module | None = None) -> None:
    """Make sure logits == lm_head(backbone(x)) for this family (no softcapping or logit scaling).

    One forward of 8 tokens; a family that post-processes logits would otherwise train on the wrong
    distribution silently. `root`: the FSDP2 root of a sharded model (`nexus.sharding.ShardedRoot`),
    through which both forwards run.
    """
    vocab = vocab_size(model)
    ids = (torch.arange(8, device=device) * 7919 % vocab)[None]  # (1, 8) arbitrary tokens
    mask = torch.ones_like(ids)
    was_training = model.training
    model.eval()
    try:
        if root is None:
            full = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
            split = lm_head_of(model)(hidden_states(backbone_of(model), ids, mask)).float()
        else:
            full = root(ids, mask, logits=True).float()
            split = lm_head_of(model)(root(ids, mask)).float()
    finally:
        model.train(was_training)
    # a base whose logits overflow is compared where they are finite; the caller reports the overflow
    finite = full.isfinite()
    scale = float(full[finite].abs().max()) if finite.any() else 1.0
    if not torch.equal(finite, split.isfinite()) or not torch.allclose(
            full[finite], split[finite], rtol=1e-3, atol=1e-3 * max(scale, 1.0)):
        raise NexusError(f"{type(model).__name__}: its logits are not lm_head(hidden states) (logit scaling or "
                         f"softcapping?); NEXUS training does not support this family yet")


class StudentBackbone(nn.Module):
    """The student's decoder stack as the module DDP wraps: (ids, mask) -> hidden (B, L, H)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.backbone = backbone_of(model)

    def forward(self, input_ids, attention_mask):
        return hidden_states(self.backbone, input_ids, attention_mask)


class RouterCapture:
    """Router logits of one forward, per MoE layer, kept only while `recording()` is active.

    Gradient checkpointing re-runs layer forwards during backward; those re-runs are not recorded.
    """

    def __init__(self, model: nn.Module, blocks: list[MoEBlock]):
        self.logits: dict[int, torch.Tensor] = {}
        self._on = False
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(router_hooks(model, self._record, blocks))

    def _record(self, layer, logits, weights, indices):
        if self._on:
            self.logits[layer] = logits  # (B*L, E), not detached

    @contextlib.contextmanager
    def recording(self) -> Iterator[dict[int, torch.Tensor]]:
        self.logits = {}
        self._on = True
        try:
            yield self.logits
        finally:
            self._on = False

    def close(self) -> None:
        self._stack.close()


def router_params(blocks: list[MoEBlock]) -> dict[str, nn.Parameter]:
    """{full name: parameter} of every router."""
    out = {}
    for b in blocks:
        if b.router is None:
            raise NexusError(f"{b.path}: no router found")
        for name, p in b.router.named_parameters():
            out[f"{b.path}.{b.router_name}.{name}"] = p
    return out


@contextlib.contextmanager
def swapped_weights(params: dict[str, nn.Parameter], values: dict[str, torch.Tensor]) -> Iterator[None]:
    """Temporarily give `params` the tensors in `values` (for no-grad forwards only).

    A plain parameter's data is swapped (no copy). A sharded (FSDP2) parameter is gathered from its
    shard storage at each forward, so its rows are copied in place there, and back afterwards.
    """
    from torch.distributed.tensor import DTensor

    saved, copied = {}, {}
    try:
        with torch.no_grad():
            for name, p in params.items():
                if isinstance(p, DTensor):
                    local = p.to_local()
                    copied[name] = local.clone()
                    local.copy_(values[name].to_local())
                else:
                    saved[name] = p.data
                    p.data = values[name]
        yield
    finally:
        with torch.no_grad():
            for name, data in saved.items():
                params[name].data = data
            for name, data in copied.items():
                params[name].to_local().copy_(data)
