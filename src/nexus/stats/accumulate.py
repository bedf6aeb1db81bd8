"""Streaming router statistics per MoE layer: float64 sums that merge exactly and give exact PCA.

For each MoE layer and each real (non-padding) token t with router logits z_t (E,):

    p_t = softmax(z_t) over all experts
    count        (1,)    sum 1
    prob_sum     (E,)    sum p_t
    prob_outer   (E, E)  sum p_t p_t^T
    topk_count   (E,)    sum [e among the routed top-k of t]
    gate_sum     (E,)    sum routing weight e received for t (0 when not routed)
    entropy_sum  (1,)    sum H(p_t), nats

mean = prob_sum / count, covariance = prob_outer / count - mean mean^T. Memory is O(layers x E^2)
whatever the number of tokens, and statistics of disjoint token sets add up (ranks, shards, resumed
runs). The file format is DESIGN.md's `router_stats.safetensors`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import NexusError
from ..fsutil import atomic_path

FORMAT = "nexus-router-stats"
VERSION = 1
FIELDS = ("count", "prob_sum", "prob_outer", "topk_count", "gate_sum", "entropy_sum")
_REQUIRED_META = ("format", "version", "model_type", "num_experts", "top_k", "moe_layers", "tokens", "source_model")


def field_shape(field: str, num_experts: int) -> tuple[int, ...]:
    if field in ("count", "entropy_sum"):
        return (1,)
    return (num_experts, num_experts) if field == "prob_outer" else (num_experts,)


class RouterStats:
    """Sums of router statistics for the MoE layers of one model (float64, on one device)."""

    def __init__(self, moe_layers: list[int], num_experts: int, top_k: int, model_type: str = "",
                 source_model: str = "", device: torch.device | str = "cpu"):
        self.moe_layers = [int(i) for i in moe_layers]
        self.num_experts = int(num_experts)
        self.top_k = int(top_k)
        self.model_type = model_type
        self.source_model = source_model
        self.sums = {i: {f: torch.zeros(field_shape(f, self.num_experts), dtype=torch.float64, device=device)
                         for f in FIELDS} for i in self.moe_layers}

    @classmethod
    def for_model(cls, model, source_model: str = "", device=None) -> "RouterStats":
        """Empty statistics shaped for `model` (sizes from its MoE blocks and config)."""
        from ..moe import find_moe_blocks
        from ..routing import routed_top_k

        blocks = find_moe_blocks(model)
        experts = {b.layout.num_experts for b in blocks}
        if len(experts) != 1:
            raise NexusError(f"MoE layers with different expert counts {sorted(experts)} are not supported")
        device = device if device is not None else next(model.parameters()).device
        return cls([b.layer for b in blocks], experts.pop(), routed_top_k(model.config),
                   getattr(model.config, "model_type", ""), source_model, device)

    @property
    def tokens(self) -> int:
        return int(self.sums[self.moe_layers[0]]["count"].item()) if self.moe_layers else 0

    def update(self, layer: int, logits: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Add tokens: logits (T, E), routing weights (T, k), routed expert indices (T, k). Returns p (T, E) float64."""
        s = self.sums[layer]
        device = s["count"].device  # routers of a model split over devices all feed one set of sums
        p = torch.softmax(logits.detach().to(device, torch.float64), dim=-1)  # (T, E)
        s["count"] += p.shape[0]
        s["prob_sum"] += p.sum(0)
        s["prob_outer"].addmm_(p.T, p)  # one (E, T) @ (T, E) matmul per layer and batch
        flat_idx = indices.detach().reshape(-1).to(device, torch.long)  # (T k,)
        s["topk_count"] += torch.bincount(flat_idx, minlength=self.num_experts).to(torch.float64)
        s["gate_sum"].index_add_(0, flat_idx, weights.detach().reshape(-1).to(device, torch.float64))
        s["entropy_sum"] += -(p * torch.log(p.clamp_min(1e-300))).sum()
        return p

    # ----- combining -------------------------------------------------------------------------------

    def check_compatible(self, other: "RouterStats", what: str = "statistics") -> None:
        for name in ("model_type", "num_experts", "top_k", "moe_layers"):
            a, b = getattr(self, name), getattr(other, name)
            if a != b:
                raise NexusError(f"{what}: {name} differs ({a} vs {b}); statistics of different models do not merge")

    def merge_(self, other: "RouterStats") -> "RouterStats":
        """Add `other`'s sums to these (in place)."""
        self.check_compatible(other)
        for i in self.moe_layers:
            for f in FIELDS:
                self.sums[i][f] += other.sums[i][f].to(self.sums[i][f].device)
        return self

    def nonfinite(self) -> tuple[int, str] | None:
        """The first (layer, field) holding NaN or Inf, or None when every sum is finite."""
        for i in self.moe_layers:
            for f in FIELDS:
                if not torch.isfinite(self.sums[i][f]).all():
                    return i, f
        return None

    def flat(self) -> torch.Tensor:
        """All sums in one float64 vector (for one all-reduce instead of one per tensor)."""
        return torch.cat([self.sums[i][f].reshape(-1) for i in self.moe_layers for f in FIELDS])

    def load_flat_(self, flat: torch.Tensor) -> "RouterStats":
        pos = 0
        for i in self.moe_layers:
            for f in FIELDS:
                t = self.sums[i][f]
                t.copy_(flat[pos:pos + t.numel()].view_as(t))
                pos += t.numel()
        return self

    @property
    def device(self) -> torch.device:
        return self.sums[self.moe_layers[0]]["count"].device

    def copy(self, device=None) -> "RouterStats":
        device = self.device if device is None else device
        out = RouterStats(self.moe_layers, self.num_experts, self.top_k, self.model_type, self.source_model, device)
        return out.load_flat_(self.flat().to(device))

    # ----- files -----------------------------------------------------------------------------------

    def metadata(self) -> dict[str, str]:
        return {"format": FORMAT, "version": str(VERSION), "model_type": self.model_type,
                "num_experts": str(self.num_experts), "top_k": str(self.top_k),
                "moe_layers": json.dumps(self.moe_layers), "tokens": str(self.tokens),
                "source_model": self.source_model}

    def save(self, path: str | os.PathLike, extra_metadata: dict[str, str] | None = None) -> Path:
        """Write `router_stats.safetensors` atomically (extra metadata: e.g. a partial run's position)."""
        tensors = {f"layers.{i}.{f}": self.sums[i][f].detach().cpu().contiguous()
                   for i in self.moe_layers for f in FIELDS}
        meta = self.metadata()
        meta.update({k: str(v) for k, v in (extra_metadata or {}).items()})
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike, device="cpu") -> tuple["RouterStats", dict[str, str]]:
        """Read and check a statistics file. Returns the statistics and the file's full metadata."""
        path = Path(path)
        if not path.is_file():
            raise NexusError(f"{path}: no such router statistics file")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as e:
            raise NexusError(f"{path}: not a readable safetensors file ({e}); expected router statistics "
                             f"written by `nexus collect`") from None
        if meta.get("format") != FORMAT:
            raise NexusError(f"{path}: not NEXUS router statistics (format is {meta.get('format')!r}, "
                             f"expected {FORMAT!r})")
        missing = [k for k in _REQUIRED_META if k not in meta]
        if missing:
            raise NexusError(f"{path}: metadata lacks {', '.join(missing)}")
        try:
            version, num_experts, top_k = int(meta["version"]), int(meta["num_experts"]), int(meta["top_k"])
            layers = json.loads(meta["moe_layers"])
            assert isinstance(layers, list) and all(isinstance(i, int) for i in layers) and layers
        except (ValueError, AssertionError, json.JSONDecodeError):
            raise NexusError(f"{path}: malformed metadata (version/num_experts/top_k/moe_layers)") from None
        if version > VERSION:
            raise NexusError(f"{path}: statistics format version {version} is newer than this NEXUS reads ({VERSION})")
        stats = cls(layers, num_experts, top_k, meta["model_type"], meta["source_model"], device)
        for i in layers:
            for f in FIELDS:
                key = f"layers.{i}.{f}"
                t = tensors.get(key)
                shape = field_shape(f, num_experts)
                if t is None or tuple(t.shape) != shape or t.dtype != torch.float64:
                    got = "missing" if t is None else f"{t.dtype} {tuple(t.shape)}"
                    raise NexusError(f"{path}: tensor {key} is {got}, expected float64 {shape} "
                                     f"(num_experts={num_experts})")
                if not torch.isfinite(t).all():
                    raise NexusError(f"{path}: tensor {key} holds NaN or infinite values")
                stats.sums[i][f].copy_(t)
        counts = {int(stats.sums[i]["count"].item()) for i in layers}
        if len(counts) != 1 or counts.pop() != int(meta["tokens"]):
            raise NexusError(f"{path}: token counts disagree between layers and the 'tokens' metadata")
        return stats, dict(meta)


class Collector:
    """Router hook: feeds the real tokens of the current batch into `RouterStats` (and a reservoir).

    Use with `routing.router_hooks(model, collector)`; call `set_batch` before each forward. When the
    reservoir keeps hidden states, `experts_input` must also see what each layer's experts read (the
    router of a layer runs first: its probabilities wait for the hidden states of the same tokens).
    """

    def __init__(self, stats: RouterStats, reservoir=None):
        self.stats = stats
        self.reservoir = reservoir
        self.rows: torch.Tensor | None = None
        self.num_rows = 0
        self.batch_index = 0
        self.pending: dict[int, torch.Tensor] = {}  # layer -> probs (T, E) waiting for their hidden states

    @property
    def keeps_hidden(self) -> bool:
        return self.reservoir is not None and self.reservoir.hidden is not None

    def set_batch(self, attention_mask: torch.Tensor, batch_index: int = 0) -> None:
        """attention_mask (B, L): 1 for real tokens. Router rows are the B x L tokens in row-major order."""
        if self.pending:
            raise RuntimeError(f"layers {sorted(self.pending)}: the router ran but the experts never read the batch")
        mask = attention_mask.reshape(-1).bool()  # (B L,)
        self.num_rows = mask.numel()
        self.rows = None if bool(mask.all()) else mask.nonzero().squeeze(1)  # (T_real,)
        self.batch_index = batch_index

    def __call__(self, layer: int, logits: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> None:
        if logits.shape[0] != self.num_rows:
            raise RuntimeError(f"layer {layer}: router saw {logits.shape[0]} tokens, the batch has {self.num_rows}")
        if indices.shape[-1] != self.stats.top_k:  # the recorded top_k must be what the routers do
            raise NexusError(f"layer {layer}: the router selects {indices.shape[-1]} experts per token, the model "
                             f"config says {self.stats.top_k}")
        if self.rows is not None:
            logits, weights, indices = (t.index_select(0, self.rows) for t in (logits, weights, indices))
        with torch.no_grad():
            p = self.stats.update(layer, logits, weights, indices)
            if self.keeps_hidden:
                self.pending[layer] = p
            elif self.reservoir is not None:
                self.reservoir.offer(layer, p, self.batch_index)

    def experts_input(self, layer: int, hidden: torch.Tensor) -> None:
        """What layer `layer`'s experts read for the current batch: (B L, H) or (B, L, H)."""
        if not self.keeps_hidden:
            return
        probs = self.pending.pop(layer, None)
        if probs is None:
            raise RuntimeError(f"layer {layer}: the experts ran before the router")
        flat = hidden.reshape(-1, hidden.shape[-1])  # (B L, H)
        if flat.shape[0] != self.num_rows or flat.shape[1] != self.reservoir.hidden_size:
            raise NexusError(f"layer {layer}: the experts read {tuple(hidden.shape)}, expected {self.num_rows} tokens "
                             f"of width {self.reservoir.hidden_size}; --keep-hidden cannot sample them")
        if self.rows is not None:
            flat = flat.index_select(0, self.rows)
        with torch.no_grad():
            self.reservoir.offer(layer, probs, self.batch_index, flat.detach())
