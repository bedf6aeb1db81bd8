"""A uniform sample of raw router probability vectors per layer (`nexus collect --keep-raw N`).

With `--keep-hidden`, the same tokens' hidden states as the experts read them are kept beside their
probabilities: what `nexus convert --hidden-sample` runs the experts on to rank hidden units.

Bottom-k sampling: every token gets a random key in [0, 1) and the N tokens with the smallest keys
are kept. That is a uniform sample without replacement, and it merges exactly: the union of two
reservoirs cut back to the N smallest keys is the reservoir of the union. Keys come from a
generator seeded by (seed, global batch index, layer), so a resumed run and a `torchrun` run keep
the very same tokens as one uninterrupted process. Shards collected in separate runs need distinct
seeds, or their keys repeat.

Stored beside the statistics as `<stem>.raw.safetensors` (e.g. `router_stats.raw.safetensors`):
`layers.{i}.probs` float32 (n, E) and `layers.{i}.keys` float64 (n,), rows in key order, n <= N;
with hidden states also `layers.{i}.hidden` (n, H) in the model's dtype; header metadata
`format=nexus-router-raw`, `version=1`, `size` (N), `num_experts`, `moe_layers`, `hidden_size` (0: none).
The statistics file itself stays exactly as DESIGN.md specifies.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import NexusError
from ..fsutil import atomic_path

FORMAT = "nexus-router-raw"
VERSION = 1


def raw_path(stats_path: str | os.PathLike) -> Path:
    """`router_stats.safetensors` -> `router_stats.raw.safetensors`."""
    p = Path(stats_path)
    stem = p.name[: -len(".safetensors")] if p.name.endswith(".safetensors") else p.name
    return p.with_name(f"{stem}.raw.safetensors")


def sample_bytes(layers: int, num_experts: int, size: int, hidden_size: int = 0, hidden_bytes: int = 2) -> int:
    """Bytes of a full raw sample of `size` tokens per layer, as a RawReservoir holds it and as its file
    stores it (less the header): per token and layer a float64 key, float32 probabilities and, with hidden
    states, `hidden_size` values of `hidden_bytes`."""
    return int(layers) * int(size) * (8 + 4 * int(num_experts) + int(hidden_size) * int(hidden_bytes))


class RawReservoir:
    """Up to `size` probability vectors per layer, with their keys (empty slots hold key = inf)."""

    def __init__(self, moe_layers: list[int], num_experts: int, size: int, seed: int = 0, device="cpu",
                 hidden_size: int = 0, hidden_dtype: torch.dtype = torch.float32):
        self.moe_layers = [int(i) for i in moe_layers]
        self.num_experts = int(num_experts)
        self.size = int(size)
        self.seed = int(seed)
        self.hidden_size = int(hidden_size)  # 0: probabilities only
        self.keys = {i: torch.full((self.size,), float("inf"), dtype=torch.float64, device=device)
                     for i in self.moe_layers}  # (N,)
        self.probs = {i: torch.zeros(self.size, self.num_experts, dtype=torch.float32, device=device)
                      for i in self.moe_layers}  # (N, E)
        self.hidden = {i: torch.zeros(self.size, self.hidden_size, dtype=hidden_dtype, device=device)
                       for i in self.moe_layers} if self.hidden_size else None  # (N, H)

    def empty_like(self, device=None) -> "RawReservoir":
        """A reservoir with the same layers, size, seed and hidden states (dtype), holding nothing, on `device`
        (default: this one's)."""
        h = self.hidden[self.moe_layers[0]] if self.hidden is not None else None
        return RawReservoir(self.moe_layers, self.num_experts, self.size, self.seed,
                            self.keys[self.moe_layers[0]].device if device is None else device, self.hidden_size,
                            h.dtype if h is not None else torch.float32)

    def _keys_for(self, layer: int, batch_index: int, n: int, device) -> torch.Tensor:
        state = np.random.SeedSequence([self.seed, int(batch_index), int(layer)]).generate_state(2)
        gen = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
        return torch.rand(n, generator=gen, dtype=torch.float64).to(device)  # (n,)

    def offer(self, layer: int, probs: torch.Tensor, batch_index: int, hidden: torch.Tensor | None = None) -> None:
        """Consider the tokens of one batch: probs (T, E), and their hidden states (T, H) when the reservoir keeps them."""
        self.keep(layer, self._keys_for(layer, batch_index, probs.shape[0], probs.device), probs, hidden)

    def keep(self, layer: int, keys: torch.Tensor, probs: torch.Tensor, hidden: torch.Tensor | None = None) -> None:
        if (hidden is None) != (self.hidden is None):
            raise ValueError("hidden states must be offered exactly when the reservoir keeps them")
        all_keys = torch.cat([self.keys[layer], keys.to(self.keys[layer].device)])  # (N + T,)
        all_probs = torch.cat([self.probs[layer], probs.to(self.probs[layer].device, torch.float32)])
        kept, idx = torch.topk(all_keys, self.size, largest=False, sorted=True)
        self.keys[layer], self.probs[layer] = kept, all_probs[idx]
        if hidden is not None:
            mine = self.hidden[layer]
            self.hidden[layer] = torch.cat([mine, hidden.to(mine.device, mine.dtype)])[idx]  # (N, H)

    def merge_(self, other: "RawReservoir") -> "RawReservoir":
        if (other.moe_layers, other.num_experts, other.size, other.hidden_size) != \
                (self.moe_layers, self.num_experts, self.size, self.hidden_size):
            raise NexusError("raw reservoirs differ in layers, expert count, size or hidden states; they do not merge")
        for i in self.moe_layers:
            self.keep(i, other.keys[i], other.probs[i], other.hidden[i] if other.hidden is not None else None)
        return self

    def filled(self, layer: int) -> torch.Tensor:
        """The kept probability vectors of `layer`: (n, E), n <= size."""
        return self.probs[layer][torch.isfinite(self.keys[layer])]

    def filled_hidden(self, layer: int) -> torch.Tensor:
        """The kept hidden states of `layer`: (n, H), rows as `filled`'s."""
        return self.hidden[layer][torch.isfinite(self.keys[layer])]

    def save(self, path: str | os.PathLike) -> Path:
        tensors = {}
        for i in self.moe_layers:
            keep = torch.isfinite(self.keys[i])
            tensors[f"layers.{i}.keys"] = self.keys[i][keep].cpu().contiguous()
            tensors[f"layers.{i}.probs"] = self.probs[i][keep].cpu().contiguous()
            if self.hidden is not None:
                tensors[f"layers.{i}.hidden"] = self.hidden[i][keep].cpu().contiguous()
        meta = {"format": FORMAT, "version": str(VERSION), "size": str(self.size), "seed": str(self.seed),
                "num_experts": str(self.num_experts), "moe_layers": json.dumps(self.moe_layers),
                "hidden_size": str(self.hidden_size)}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike, device="cpu") -> "RawReservoir":
        path = Path(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            if meta.get("format") != FORMAT:
                raise ValueError(f"format is {meta.get('format')!r}, expected {FORMAT!r}")
            layers, hidden_size = json.loads(meta["moe_layers"]), int(meta.get("hidden_size", 0))
            dtype = tensors[f"layers.{layers[0]}.hidden"].dtype if hidden_size and layers else torch.float32
            res = cls(layers, int(meta["num_experts"]), int(meta["size"]), int(meta.get("seed", 0)), device,
                      hidden_size, dtype)
            for i in res.moe_layers:
                keys, probs = tensors[f"layers.{i}.keys"], tensors[f"layers.{i}.probs"]
                n = keys.shape[0]
                if n > res.size or tuple(probs.shape) != (n, res.num_experts):
                    raise ValueError(f"layer {i}: shapes {tuple(keys.shape)} / {tuple(probs.shape)}")
                res.keys[i][:n], res.probs[i][:n] = keys.to(torch.float64), probs.to(torch.float32)
                if hidden_size:
                    hidden = tensors[f"layers.{i}.hidden"]
                    if tuple(hidden.shape) != (n, hidden_size):
                        raise ValueError(f"layer {i}: hidden states {tuple(hidden.shape)}, expected ({n}, {hidden_size})")
                    res.hidden[i][:n] = hidden
        except (SafetensorError, OSError, ValueError, KeyError, json.JSONDecodeError) as e:
            raise NexusError(f"{path}: not a readable raw router sample ({e})") from None
        return res


def hidden_sample_layers(path: str | os.PathLike) -> tuple[dict[int, int], int]:
    """({layer: tokens kept}, hidden size) of a raw sample that holds hidden states; anything else is an error
    naming the file and the collect flags that write one."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError(f"format is {meta.get('format')!r}, expected {FORMAT!r}")
            hidden_size = int(meta.get("hidden_size", 0))
            if not hidden_size:
                raise NexusError(f"{path}: the raw sample holds no hidden states (collect it with --keep-raw N "
                                 f"--keep-hidden)")
            layers = {int(i): f.get_slice(f"layers.{int(i)}.hidden").get_shape()[0]
                      for i in json.loads(meta["moe_layers"])}
    except (SafetensorError, OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        raise NexusError(f"{path}: not a readable raw router sample ({e})") from None
    return layers, hidden_size


def read_hidden(path: str | os.PathLike, layer: int) -> torch.Tensor:
    """One layer's kept hidden states from a raw sample: (n, H), in the dtype collect kept them in."""
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(f"layers.{int(layer)}.hidden")
