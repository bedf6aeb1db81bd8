"""Training losses: per-token CE and KL (dense and sparse), router KL / L1, and a chunked LM head.

All per-token functions take logits or log-probabilities of the N selected positions (padding and
the last position of each sequence already removed) and return one value per position, (N,), in
fp32. Reductions and weights live in the recipe, so every function here is tested on its own.

KL is forward KL(teacher ‖ student) of the next-token distributions at temperature T, *without*
the T² factor (the recipe applies it; the logged `kl` includes it, per DESIGN "Metric definitions").

Sparse KL (offline distillation) sees only the teacher's top-k log-probabilities at T = 1. Both
sides are reduced to the same k + 1 buckets — the k stored tokens plus one tail bucket holding the
rest of the mass — and *then* tempered: bucket log-probs are divided by T and renormalized over the
k + 1 buckets. For the k tokens that is exact (softmax(z/T) restricted to them is proportional to
exp(logp/T)); the tail is treated as one pseudo-token. With k = V the tail is empty and the result
equals the dense KL at any T; with k < V it is the KL between two proper (k + 1)-bucket
distributions, so it is ≥ 0, and at T = 1 it grows toward the dense KL as k grows (a coarser
partition can only lose divergence).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..base.cpu_matmul import fp32_products, linear_fp32, linear_fp32_input_grad


def next_token_positions(attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where a next-token loss applies. attention_mask (B, L) -> (src (N,), dst (N,)) flat indices.

    Position i (in B × L row-major order) predicts token i + 1 of the same sequence; both must be real
    tokens. `hidden.view(B*L, H)[src]` are the inputs, `input_ids.view(-1)[dst]` the targets.
    """
    b, length = attention_mask.shape
    valid = attention_mask[:, :-1].bool() & attention_mask[:, 1:].bool()  # (B, L-1)
    rows, cols = valid.nonzero(as_tuple=True)
    src = rows * length + cols
    return src, src + 1


def token_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Next-token NLL. logits (N, V), targets (N,) -> (N,)."""
    return F.cross_entropy(logits.float(), targets, reduction="none")


def token_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(t/T) ‖ softmax(s/T)) per position. (N, V), (N, V) -> (N,)."""
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="none").sum(-1)


def _tempered_buckets(logp_k: torch.Tensor, tail: torch.Tensor | None, temperature: float) -> torch.Tensor:
    """(N, k) log-probs + (N, 1) tail log-prob at T = 1 -> (N, k[+1]) log-probs at temperature T."""
    x = logp_k if tail is None else torch.cat([logp_k, tail], dim=-1)
    return F.log_softmax(x / temperature, dim=-1)


def teacher_buckets(topk_logprobs: torch.Tensor, temperature: float, vocab_size: int) -> torch.Tensor:
    """Teacher's (k + 1)-bucket log-probs at T from stored top-k log-probs at T = 1. (N, k) -> (N, k+1).

    The tail mass is 1 − Σ exp(top-k); stored fp16 log-probs can sum slightly above 1, so it is
    clamped at 0 (log 0 = -inf, i.e. an empty bucket). With k = V there is no tail bucket.
    """
    lp = topk_logprobs.float()
    if lp.shape[-1] >= vocab_size:
        return _tempered_buckets(lp, None, temperature)
    mass = lp.exp().sum(-1, keepdim=True).clamp(max=1.0)  # (N, 1)
    tail = torch.log1p(-mass)  # (N, 1), -inf when the top-k hold everything
    return _tempered_buckets(lp, tail, temperature)


def student_buckets(student_logits: torch.Tensor, topk_indices: torch.Tensor, temperature: float) -> torch.Tensor:
    """Student's (k + 1)-bucket log-probs at T on the teacher's top-k tokens. (N, V), (N, k) -> (N, k+1)."""
    logp = F.log_softmax(student_logits.float(), dim=-1)  # (N, V) at T = 1
    idx = topk_indices.long()
    logp_k = logp.gather(-1, idx)  # (N, k)
    if idx.shape[-1] >= logp.shape[-1]:
        return _tempered_buckets(logp_k, None, temperature)
    # Tail = log Σ over the tokens not in the top-k. A finite fill (not -inf) keeps gradients finite
    # when a row's tail is empty.
    rest = logp.scatter(-1, idx, torch.finfo(logp.dtype).min)
    tail = torch.logsumexp(rest, dim=-1, keepdim=True)  # (N, 1)
    return _tempered_buckets(logp_k, tail, temperature)


def bucket_kl(teacher_logp: torch.Tensor, student_logp: torch.Tensor) -> torch.Tensor:
    """KL between bucket distributions given as log-probs; empty teacher buckets add 0. (N, K) -> (N,)."""
    p = teacher_logp.exp()
    return (torch.xlogy(p, p) - p * student_logp).sum(-1)


def sparse_token_kl(student_logits: torch.Tensor, topk_logprobs: torch.Tensor, topk_indices: torch.Tensor,
                    temperature: float) -> torch.Tensor:
    """Sparse KL(teacher ‖ student) at T over k stored tokens + tail. (N, V), (N, k), (N, k) -> (N,)."""
    t = teacher_buckets(topk_logprobs, temperature, student_logits.shape[-1])
    s = student_buckets(student_logits, topk_indices, temperature)
    return bucket_kl(t, s)


def router_kl(teacher_probs: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_teacher ‖ p_student) over experts per token. (T, E) probs, (T, E) logits -> (T,)."""
    s = F.log_softmax(student_logits.float(), dim=-1)
    p = teacher_probs.float()
    return (torch.xlogy(p, p) - p * s).sum(-1)


def router_l1(student_probs: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """‖p_student − p_teacher‖₁ per token. (T, E), (T, E) -> (T,)."""
    return (student_probs.float() - teacher_probs.float()).abs().sum(-1)


def sparse_router_terms(student_logits: torch.Tensor, topk_logprobs: torch.Tensor,
                        topk_indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Router KL and L1 against stored teacher top-R router log-probs (+ tail). -> ((T,), (T,)).

    Exact when R = E. With R < E the L1 is taken over the R + 1 buckets, a lower bound of the full L1.
    """
    num_experts = student_logits.shape[-1]
    t = teacher_buckets(topk_logprobs, 1.0, num_experts)
    s = student_buckets(student_logits, topk_indices, 1.0)
    return bucket_kl(t, s), (s.exp() - t.exp()).abs().sum(-1)


TermsFn = Callable[[torch.Tensor, slice], dict[str, torch.Tensor]]


def head_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """(n, H) hidden states -> (n, V) fp32 logits of a frozen head.

    On a CPU without a fast bf16/fp16 GEMM a low-precision head is multiplied in fp32, a slice of its
    rows at a time (`nexus.base.cpu_matmul`): there torch's bf16 matmul runs at a small fraction of
    its fp32 speed, and a 200k-row head makes it the slowest step of a training step.
    """
    if not fp32_products(weight.dtype, weight.device):
        return F.linear(h, weight, bias).float()
    return linear_fp32(h, weight, bias)


def head_input_grad(dz: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(n, V) fp32 gradient of the logits -> (n, H) gradient of the hidden states, as `head_logits` computes."""
    if not fp32_products(weight.dtype, weight.device):
        return dz.to(weight.dtype) @ weight
    return linear_fp32_input_grad(dz, weight)


class _ChunkedHead(torch.autograd.Function):
    """Loss of an LM head applied chunk by chunk; only one chunk's logits exist at a time.

    The forward computes, per chunk, the logits, the weighted loss and (when training) the gradient
    with respect to the chunk's hidden states; the backward only scales that stored gradient. So the
    (N, V) logits — 200k wide for GPT-OSS — are never materialized, and nothing is recomputed.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, terms_fn, weights, chunk_size):
        names = list(weights)
        sums = torch.zeros(len(names), dtype=torch.float32, device=hidden.device)
        need_grad = ctx.needs_input_grad[0]
        grad_hidden = torch.zeros_like(hidden) if need_grad else None
        for start in range(0, hidden.shape[0], chunk_size):
            sl = slice(start, min(start + chunk_size, hidden.shape[0]))
            with torch.enable_grad():
                z = head_logits(hidden[sl].detach(), weight, bias).requires_grad_(need_grad)  # (n, V)
                terms = terms_fn(z, sl)
                parts = torch.stack([terms[k].sum() for k in names])  # (K,)
                loss = (parts * parts.new_tensor([weights[k] for k in names])).sum()
            if need_grad:
                (dz,) = torch.autograd.grad(loss, z)  # (n, V)
                grad_hidden[sl] = head_input_grad(dz, weight).to(hidden.dtype)  # (n, H)
            sums += parts.detach()
        ctx.save_for_backward(grad_hidden if need_grad else None)
        total = (sums * sums.new_tensor([weights[k] for k in names])).sum()
        ctx.mark_non_differentiable(sums)
        return total, sums

    @staticmethod
    def backward(ctx, grad_total, grad_sums):
        (grad_hidden,) = ctx.saved_tensors
        if grad_hidden is None:
            return None, None, None, None, None, None
        return grad_hidden * grad_total.to(grad_hidden.dtype), None, None, None, None, None


def chunked_head_loss(hidden: torch.Tensor, head: torch.nn.Module, terms_fn: TermsFn,
                      weights: dict[str, float], chunk_size: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Σ_k weights[k] × Σ_positions terms[k], with logits computed `chunk_size` positions at a time.

    Args:
        hidden: (N, H) final hidden states of the selected positions.
        head: the frozen LM head (nn.Linear, weight (V, H)).
        terms_fn: (logits (n, V) fp32, slice of the N positions) -> {name: (n,) per-position values}.
        weights: name -> weight in the differentiable total (0 keeps a term as a statistic only).
    Returns:
        (total, {name: Σ over positions}) — total is differentiable w.r.t. `hidden`.
    """
    if chunk_size < 1:
        raise ValueError("chunk_size must be positive")
    total, sums = _ChunkedHead.apply(hidden, head.weight, getattr(head, "bias", None), terms_fn, dict(weights),
                                     chunk_size)
    return total, {k: sums[i] for i, k in enumerate(weights)}
