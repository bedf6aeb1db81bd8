"""The loss of one batch: CE + KL through the chunked LM head, plus router terms; and its statistics.

Kept apart from the recipe so it can be checked against an independent computation on a fixed
batch (tests/test_train_losses.py) and reused by evaluation.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..forward import RouterCapture
from ..routing import entropy
from .losses import chunked_head_loss, next_token_positions, router_kl, router_l1, sparse_router_terms, token_ce

# Sums a batch contributes (over target positions for ce/kl, over real tokens × MoE layers for the rest).
STATS = ("ce", "kl", "router_kl", "router_l1", "entropy", "teacher_entropy", "targets", "tokens")


def batch_loss(student: Callable, head: nn.Linear, capture: RouterCapture, teacher, input_ids: torch.Tensor,
               attention_mask: torch.Tensor, weights: dict[str, float], router_weight: float, temperature: float,
               chunk_size: int, use_teacher: bool = True, positions=None,
               cached: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted loss (differentiable) and the batch's sums in `STATS` order (float64, detached).

    Args:
        student: (ids (B, L), mask (B, L)) -> final hidden states (B, L, H); records routers via `capture`.
        weights: {"ce": w, "kl": w} multiplying the per-token sums (the caller folds in T² and 1/N).
        router_weight: multiplies Σ over real tokens and layers of the router KL.
    """
    device = input_ids.device
    src, dst = next_token_positions(attention_mask)  # (N,), (N,)
    targets = input_ids.reshape(-1)[dst]  # (N,)
    real = attention_mask.reshape(-1).bool()  # (B*L,)
    t = teacher(input_ids, attention_mask, src, real, positions=positions, cached=cached) if use_teacher else None
    with capture.recording() as router_logits:
        h = student(input_ids, attention_mask)  # (B, L, H)
    h = h.reshape(-1, h.shape[-1])[src]  # (N, H)

    def terms(z, sl):  # z (n, V): fp32 student logits of positions sl
        out = {"ce": token_ce(z, targets[sl])}
        if t is not None:
            out["kl"] = t.kl_terms(z, sl, temperature)
        return out

    loss, sums = chunked_head_loss(h, head, terms, weights if t is not None else {"ce": weights["ce"]}, chunk_size)
    zero = torch.zeros((), dtype=torch.float64, device=device)
    acc = dict.fromkeys(STATS, zero)
    acc["ce"], acc["kl"] = sums["ce"].double(), sums.get("kl", zero).double()
    acc["targets"] = zero + src.numel()
    acc["tokens"] = zero + int(real.sum())
    for layer, logits in router_logits.items():
        s_logits = logits[real]  # (T_real, E)
        p_s = torch.softmax(s_logits.detach().float(), -1)  # (T_real, E)
        acc["entropy"] = acc["entropy"] + entropy(p_s).sum()
        if t is None or not t.has_router:
            continue
        if t.router:
            p_t = t.router[layer]  # (T_real, E)
            rkl, l1 = router_kl(p_t, s_logits), router_l1(p_s, p_t)
            acc["teacher_entropy"] = acc["teacher_entropy"] + entropy(p_t).sum()
        else:
            rkl, l1 = sparse_router_terms(s_logits, *t.router_sparse[layer])
        if router_weight > 0:
            loss = loss + router_weight * rkl.sum()
        acc["router_kl"] = acc["router_kl"] + rkl.detach().sum()
        acc["router_l1"] = acc["router_l1"] + l1.sum()
    return loss, torch.stack([acc[k].double() for k in STATS])


def metrics_row(sums: dict[str, float], num_layers: int, temperature: float, ce_weight: float, kl_weight: float,
                router_kl_weight: float, router: str | None) -> dict:
    """Per-token means of a step's (all-reduced) sums; fields that do not apply are None.

    `router`: what the teacher gave about routing — "dense" probabilities, "sparse" top-R, or None
    (no teacher this step, or a teacher without a matching router).
    """
    n, per_router = sums["targets"], sums["tokens"] * num_layers
    use_teacher = kl_weight > 0 or router_kl_weight > 0
    row = {"ce": sums["ce"] / n, "kl": temperature ** 2 * sums["kl"] / n if use_teacher else None,
           "router_kl": sums["router_kl"] / per_router if router else None,
           "router_l1": sums["router_l1"] / per_router if router else None,
           "router_entropy": sums["entropy"] / per_router,
           "teacher_router_entropy": sums["teacher_entropy"] / per_router if router == "dense" else None}
    row["loss"] = ce_weight * row["ce"] + kl_weight * (row["kl"] or 0.0) + router_kl_weight * (row["router_kl"] or 0.0)
    return row
