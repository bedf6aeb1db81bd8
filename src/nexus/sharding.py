"""The frozen base sharded across ranks with PyTorch FSDP2 (`--shard-base`), for models one device cannot hold.

    model = build_sharded(...)              # see nexus.base.loader.load_sharded_base
    root = shard_model(model, device)       # fully_shard: one unit per decoder layer, the rest in the root
    hidden = root(input_ids, attention_mask)            # (B, L, H); lm_head gathered until backward ends
    full = gather_full(param)               # a sharded parameter's whole value (all ranks call it)

Every parameter of the model, quantized bytes (uint8, float8) included, is sharded along dim 0
across the ranks: each rank keeps its rows, and a decoder layer's parameters are gathered for its
forward (and again for its backward) and released after it. The trainable shared experts sit in
their decoder layer's unit. Trainable routers get a unit of their own, kept in fp32 and computed in
the base's dtype through FSDP2's `MixedPrecisionPolicy` (so they need no separate fp32 masters). The
root unit holds the embeddings, the final norm and the LM head; FSDP2 keeps a root's parameters
gathered from its forward until the end of backward, which is when the chunked LM-head loss reads
the head's weight.

Every forward must go through the root (`ShardedRoot`): it is what gathers the root's parameters and
sets up the units below it. Tied input and output embeddings are refused: they would be one
parameter in two units.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import NexusError
from .forward import backbone_of, hidden_states, lm_head_of

SHARD_BASE_HELP = ("shard the frozen base across the torchrun ranks with FSDP2 (each rank holds 1/N of it; for "
                   "bases one device cannot hold); without torchrun, launches --nproc processes")


class ShardedRoot(nn.Module):
    """The FSDP2 root around a causal LM: (ids, mask) -> final hidden states, or the full logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, logits: bool = False):
        if logits:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        return hidden_states(backbone_of(self.model), input_ids, attention_mask)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    layers = getattr(backbone_of(model), "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise NexusError(f"{type(model).__name__}: no decoder layer list (model.layers) to shard")
    return list(layers)


def device_mesh(device: torch.device):
    from torch.distributed.device_mesh import init_device_mesh

    from . import dist

    if not dist.is_distributed():
        raise NexusError("--shard-base runs under torchrun (pass --nproc N, or launch with torchrun)")
    return init_device_mesh(device.type, (dist.world_size(),))


def shard_model(model: nn.Module, device: torch.device, router_modules: list[nn.Module] = ()) -> ShardedRoot:
    """Apply FSDP2 to `model` in place (params may still be on the meta device); returns the root.

    `router_modules`: trainable routers, each made a unit of its own in fp32, computed in their dtype.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    head, embed = lm_head_of(model), model.get_input_embeddings()
    if head.weight is embed.weight:
        raise NexusError(f"{type(model).__name__}: tied input and output embeddings are not supported with "
                         f"--shard-base")
    mesh = device_mesh(device)
    # FSDP2 shards along a dimension: a 0-dim parameter (a shared expert's scalar gate) stays whole on every
    # rank, outside the units, and the trainer averages its gradient over the ranks (`replicated_parameters`)
    scalars = {p for p in model.parameters() if p.dim() == 0}
    for router in router_modules:
        dtypes = {p.dtype for p in router.parameters()}
        dtype = dtypes.pop() if len(dtypes) == 1 else None
        if dtype is None:
            raise NexusError(f"{type(router).__name__}: router parameters of several dtypes")
        router.nexus_param_dtype = dtype  # what the adapter stores
        router.float()
        policy = MixedPrecisionPolicy(param_dtype=None if dtype == torch.float32 else dtype,
                                      reduce_dtype=torch.float32)
        fully_shard(router, mesh=mesh, mp_policy=policy, ignored_params=scalars)
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, ignored_params=scalars)
    root = ShardedRoot(model)
    fully_shard(root, mesh=mesh, ignored_params=scalars)
    return root


def average_replicated_grads(params: list[torch.Tensor]) -> None:
    """Average over the ranks the gradients of the trainable parameters FSDP2 does not manage (0-dim ones);
    FSDP2 averages the sharded ones itself."""
    from . import dist

    for p in params:
        if p.grad is not None and not is_sharded(p):
            dist.all_reduce_sum(p.grad).div_(dist.world_size())


def is_sharded(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def gather_full(t: torch.Tensor) -> torch.Tensor:
    """The whole value of a sharded tensor (a collective: every rank calls it); any other tensor as is."""
    return t.full_tensor() if is_sharded(t) else t


def like(full: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """`full` laid out as `ref`: this rank's shard when `ref` is sharded (no communication), else `full`."""
    if not is_sharded(ref):
        return full.to(ref.device)
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(ref.device), ref.device_mesh, ref.placements, src_data_rank=None)


def local_rows(param: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(this rank's local tensor, first row, end row) of a parameter sharded along dim 0 (FSDP2's chunks)."""
    from torch.distributed.tensor import Shard

    if not is_sharded(param):
        return param.data, 0, param.shape[0] if param.dim() else 1
    if tuple(param.placements) != (Shard(0),):
        raise NexusError(f"unexpected placement {param.placements} of a sharded parameter")
    local = param.to_local()
    n, world, rank = param.shape[0], param.device_mesh.size(), param.device_mesh.get_local_rank()
    per = -(-n // world)
    start = min(rank * per, n)
    stop = min(start + per, n)
    if local.shape[0] != stop - start:
        raise NexusError(f"sharded parameter of {n} rows: rank {rank} holds {local.shape[0]}, expected {stop - start}")
    return local, start, stop


def local_nbytes(module: nn.Module) -> int:
    """Bytes of the parameters this rank holds (its shards; whole tensors where not sharded)."""
    return sum((p.to_local() if is_sharded(p) else p).nbytes for p in module.parameters())


def gather_optimizer_state(state: dict) -> dict:
    """An optimizer `state_dict()` with every sharded tensor gathered whole (a collective), on CPU."""
    return {"param_groups": state["param_groups"],
            "state": {i: {k: gather_full(v).cpu() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
                      for i, s in state["state"].items()}}


def optimizer_state_like(state: dict, params: list[torch.Tensor]) -> dict:
    """A whole optimizer state (as `gather_optimizer_state` or a one-process run wrote it) laid out as
    `params`: each per-element tensor (AdamW's moments; not its step count) becomes this rank's shard."""
    out = {}
    for i, s in state["state"].items():
        p = params[int(i)]
        out[i] = {k: like(v, p) if isinstance(v, torch.Tensor) and k != "step" else v for k, v in s.items()}
    return {"param_groups": state["param_groups"], "state": out}
