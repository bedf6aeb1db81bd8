"""Teachers: what the student is distilled from, per micro-batch.

- `SelfTeacher`: the student's own base, run with the shared experts disabled (and the original
  routers swapped back in when they are being trained) — no second copy of the model.
- `ModelTeacher`: a separately loaded model (`--teacher-model`), possibly on `--teacher-device`.
- `CacheTeacher`: stored top-k log-probabilities from `nexus precompute-teacher`.

Each returns a `TeacherOut` for the N loss positions (`src`) and the real tokens (`real`) of a batch;
`kl_terms` gives per-position KL at temperature T for one chunk of student logits.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from ..forward import RouterCapture, backbone_of, hidden_states, lm_head_of, swapped_weights
from ..moe import MoEBlock
from ..routing import router_probs
from ..shared import shared_experts_disabled
from . import losses


@dataclass
class TeacherOut:
    hidden: torch.Tensor | None = None  # (N, H) final hidden states at the loss positions (dense)
    head: nn.Linear | None = None
    topk_logprobs: torch.Tensor | None = None  # (N, k) at T = 1 (sparse)
    topk_indices: torch.Tensor | None = None  # (N, k)
    router: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> probs (T_real, E)
    router_sparse: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # (T_real, R) ×2

    def kl_terms(self, z: torch.Tensor, sl: slice, temperature: float) -> torch.Tensor:
        """Per-position KL for student logits z (n, V) of positions `sl`. -> (n,)"""
        if self.hidden is not None:
            t = losses.head_logits(self.hidden[sl], self.head.weight, self.head.bias).to(z.device)  # (n, V)
            return losses.token_kl(z, t, temperature)
        return losses.sparse_token_kl(z, self.topk_logprobs[sl], self.topk_indices[sl], temperature)

    @property
    def has_router(self) -> bool:
        return bool(self.router) or bool(self.router_sparse)


def _real_router_probs(logits: dict[int, torch.Tensor], real: torch.Tensor) -> dict[int, torch.Tensor]:
    return {layer: router_probs(lg[real.to(lg.device)]).to(real.device) for layer, lg in logits.items()}


class SelfTeacher:
    """The unmodified base inside the student: shared experts skipped, original routers in place."""

    online = True
    provides_router = True

    def __init__(self, model: nn.Module, capture: RouterCapture, routers: dict[str, nn.Parameter],
                 original_routers: dict[str, torch.Tensor] | None, root: nn.Module | None = None):
        """`root`: the FSDP2 root of a sharded student (`nexus.sharding.ShardedRoot`), run instead of the backbone."""
        self.model, self.capture, self.root = model, capture, root
        self.routers, self.original = routers, original_routers

    @torch.no_grad()
    def __call__(self, input_ids, attention_mask, src, real, positions=None, cached=None) -> TeacherOut:
        was_training = self.model.training
        self.model.eval()  # no dropout and no activation checkpointing for the teacher
        swap = swapped_weights(self.routers, self.original) if self.original else contextlib.nullcontext()
        try:
            with shared_experts_disabled(self.model), swap, self.capture.recording() as logits:
                h = hidden_states(backbone_of(self.model), input_ids, attention_mask) if self.root is None \
                    else self.root(input_ids, attention_mask)  # (B, L, H)
        finally:
            self.model.train(was_training)
        return TeacherOut(hidden=h.reshape(-1, h.shape[-1])[src], head=lm_head_of(self.model),
                          router=_real_router_probs(logits, real))


class ModelTeacher:
    """A separately loaded teacher model (frozen, eval mode) on its own device."""

    online = True

    def __init__(self, model: nn.Module, device: torch.device, blocks: list[MoEBlock] | None):
        self.model, self.device = model.eval(), device
        for p in model.parameters():
            p.requires_grad_(False)
        self.capture = RouterCapture(model, blocks) if blocks else None
        self.provides_router = self.capture is not None

    @torch.no_grad()
    def __call__(self, input_ids, attention_mask, src, real, positions=None, cached=None) -> TeacherOut:
        ids, mask = input_ids.to(self.device), attention_mask.to(self.device)
        if self.capture is None:
            h = hidden_states(backbone_of(self.model), ids, mask)
            router = {}
        else:
            with self.capture.recording() as logits:
                h = hidden_states(backbone_of(self.model), ids, mask)  # (B, L, H)
            router = _real_router_probs(logits, real)
        return TeacherOut(hidden=h.reshape(-1, h.shape[-1])[src.to(self.device)], head=lm_head_of(self.model),
                          router=router)


class CacheTeacher:
    """Stored teacher outputs (`nexus precompute-teacher`), read by stream position."""

    online = False

    def __init__(self, cache, device: torch.device, moe_layers: list[int]):
        self.cache, self.device, self.layers = cache, device, moe_layers
        self.provides_router = bool(cache.router_topk)

    def batch(self, positions) -> dict[str, torch.Tensor]:
        """The cached tensors of these stream positions (input_ids / attention_mask as int64)."""
        return self.cache.read(positions)

    def __call__(self, input_ids, attention_mask, src, real, positions=None, cached=None) -> TeacherOut:
        c = cached if cached is not None else self.cache.read(positions)
        k = c["topk_logprobs"].shape[-1]
        out = TeacherOut(topk_logprobs=c["topk_logprobs"].reshape(-1, k)[src].to(self.device),
                         topk_indices=c["topk_indices"].reshape(-1, k)[src].to(self.device))
        if "router_topk_logprobs" in c:
            lp, idx = c["router_topk_logprobs"], c["router_topk_indices"]  # (B, L, layers, R)
            flat_lp = lp.reshape(-1, *lp.shape[2:])[real.cpu()]  # (T_real, layers, R)
            flat_idx = idx.reshape(-1, *idx.shape[2:])[real.cpu()]
            out.router_sparse = {layer: (flat_lp[:, i].to(self.device), flat_idx[:, i].to(self.device))
                                 for i, layer in enumerate(self.layers)}
        return out
