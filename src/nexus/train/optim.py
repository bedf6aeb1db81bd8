"""The trainable parameters, their fp32 master copies, AdamW, clipping and SFA.

Shared experts are created in fp32 even over a bf16 base, so AdamW updates them directly. A trained
router is part of the base and has the base's dtype; updating bf16 weights in place loses every
update smaller than bf16's resolution (what the original tool did). So every trainable parameter
that is not fp32 gets an fp32 *master*: the optimizer updates the master, and the model parameter
is refreshed from it after each step. Masters are saved in checkpoints, so resuming is exact.
"""

from __future__ import annotations

import torch
from torch import nn

from ..shared import SHARED_NAME
from ..sharding import is_sharded, like


class TrainableParams:
    """Named trainable parameters (sorted by name, so optimizer state indices are stable)."""

    def __init__(self, named: dict[str, nn.Parameter]):
        self.names = sorted(named)
        self.params = [named[n] for n in self.names]
        self.masters: dict[str, torch.Tensor] = {}
        for name, p in zip(self.names, self.params):
            if p.dtype != torch.float32:
                self.masters[name] = p.detach().float().clone().requires_grad_(True)
        # what the optimizer sees: the master where there is one
        self.opt_params = [self.masters.get(n, p) for n, p in zip(self.names, self.params)]

    def numel(self) -> int:
        return sum(p.numel() for p in self.params)

    def grads_to_masters(self) -> None:
        for name, p in zip(self.names, self.params):
            if name in self.masters:
                self.masters[name].grad = None if p.grad is None else p.grad.float()

    @torch.no_grad()
    def masters_to_model(self) -> None:
        for name, p in zip(self.names, self.params):
            if name in self.masters:
                p.copy_(self.masters[name])

    def grad_norm_and_clip(self, max_norm: float | None) -> torch.Tensor:
        """Total L2 norm of the gradients before clipping; clips in place when `max_norm` > 0."""
        with_grad = [p for p in self.opt_params if p.grad is not None]
        if not with_grad:
            return torch.zeros(())
        limit = max_norm if max_norm and max_norm > 0 else float("inf")
        # sharded (FSDP2) and whole gradients have their norms taken apart; a sharded norm is a replicated DTensor
        norms = []
        for group in ([p for p in with_grad if is_sharded(p)], [p for p in with_grad if not is_sharded(p)]):
            if group:
                norm = torch.nn.utils.get_total_norm([p.grad for p in group])
                norms.append(norm.full_tensor() if is_sharded(norm) else norm)
        total = torch.linalg.vector_norm(torch.stack(norms))
        torch.nn.utils.clip_grads_with_norm_(with_grad, limit, total)
        return total

    def zero_grad(self) -> None:
        for p in self.params + list(self.masters.values()):
            p.grad = None

    def master_state(self) -> dict[str, torch.Tensor]:
        return {n: m.detach().clone() for n, m in self.masters.items()}

    @torch.no_grad()
    def load_master_state(self, state: dict[str, torch.Tensor]) -> None:
        """Masters from a checkpoint; a parameter kept in fp32 itself (a sharded run's routers) takes its
        master's value directly."""
        params = dict(zip(self.names, self.params))
        for name, m in self.masters.items():
            if name in state:
                m.copy_(like(state[name], m))
            else:  # checkpoint from before this parameter had a master: start from the model's value
                m.copy_(params[name].float())
        for name, value in state.items():
            if name not in self.masters and name in params and params[name].dtype == torch.float32:
                params[name].copy_(like(value, params[name]))
        self.masters_to_model()

    def values(self) -> dict[str, torch.Tensor]:
        """Current full-precision value of every trainable parameter."""
        return {n: self.masters.get(n, p).detach().float().clone() for n, p in zip(self.names, self.params)}

    @torch.no_grad()
    def sfa_blend(self, anchor: dict[str, torch.Tensor], alpha: float) -> None:
        """SFA: θ ← α·anchor + (1 − α)·θ on every trainable parameter (masters first, then the model).

        Deterministic and identical on every rank (parameters are identical after each DDP step), so
        it needs no communication.
        """
        for name, p in zip(self.names, self.params):
            target = self.masters.get(name, p)
            target.mul_(1.0 - alpha).add_(anchor[name].to(target.device, target.dtype), alpha=alpha)
        self.masters_to_model()


DOWN_PROJ = f"{SHARED_NAME}.down_proj"  # a shared expert's output projection (and its `_bias`)


def build_optimizer(params: TrainableParams, lr: float, weight_decay: float,
                    down_lr_ratio: float = 1.0) -> torch.optim.AdamW:
    """AdamW over the fp32 view of the trainable parameters. The lr is set per step by the schedule.

    With `down_lr_ratio` != 1 the shared experts' down projections (weights and biases) form a second
    group whose lr is the schedule's × the ratio, as LoRA+ gives B a larger lr than A.
    """
    if down_lr_ratio == 1.0:
        return torch.optim.AdamW(params.opt_params, lr=lr, weight_decay=weight_decay)
    down = [p for n, p in zip(params.names, params.opt_params) if DOWN_PROJ in n]
    rest = [p for n, p in zip(params.names, params.opt_params) if DOWN_PROJ not in n]
    groups = [{"params": rest, "lr_ratio": 1.0}, {"params": down, "lr_ratio": down_lr_ratio}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, weight_decay=weight_decay)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_ratio", 1.0)
