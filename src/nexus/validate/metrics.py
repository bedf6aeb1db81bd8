"""Validation metrics: pure functions on logits and router outputs, and `evaluate`, which runs a
model and its baseline on the same batches and accumulates everything the report needs. `evaluate`
never builds (B, L, V) logits: it applies both LM heads to the final hidden states a chunk of positions
at a time (`head_sums`), with the same definitions as `kl_divergence` and `nll`.

Definitions (shared/DESIGN.md):
- perplexity = exp(mean next-token NLL over non-padding targets); computed from the logits, so no
  auxiliary (router load-balancing) loss is ever included;
- degradation % = (ppl_model / ppl_baseline - 1) x 100;
- KL = forward KL(baseline || model) of the next-token distributions at temperature T, mean over
  non-padding positions, times T^2;
- router entropy = mean entropy (nats) of softmax(router logits) over all experts, per layer;
- routing agreement = |A ∩ B| / k for the routed top-k sets A (model) and B (baseline), mean over tokens;
- shared output ratio = Σ_t ‖shared_t‖₂ / Σ_t ‖routed_t‖₂ per layer, where "routed" is the block's
  original output (routed experts, plus the family's own shared expert where it has one).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from .. import dist
from ..errors import NexusError
from ..forward import backbone_of, check_head_split, default_chunk_size, hidden_states, lm_head_of, vocab_size
from ..moe import find_moe_blocks
from ..routing import entropy, router_hooks, router_probs
from ..shared import SHARED_NAME, recording_shared_output, shared_experts_disabled

# Rows of (tokens, vocab) processed at once in the KL, bounding its fp32 temporaries
# (3 x 1024 x 201k x 4 bytes ≈ 2.4 GB for GPT-OSS's vocabulary).
KL_CHUNK_ROWS = 1024

log = logging.getLogger("nexus.validate")


def token_nll(logits: torch.Tensor, input_ids: torch.Tensor,
              attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token NLL (nats) at each position, in fp32.

    Args: logits (B, L, V); input_ids (B, L); attention_mask (B, L), 1 = real token.
    Returns nll (B, L-1) (0 where not valid) and valid (B, L-1) bool. Position t predicts token t+1;
    it counts when both token t (the context) and token t+1 (the target) are real.
    """
    b, length, vocab = logits.shape
    targets = input_ids[:, 1:].to(logits.device)  # (B, L-1)
    nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, vocab), targets.reshape(-1),
                          reduction="none").view(b, length - 1)  # (B, L-1)
    if attention_mask is None:
        valid = torch.ones_like(nll, dtype=torch.bool)
    else:
        mask = attention_mask.to(logits.device).bool()
        valid = mask[:, :-1] & mask[:, 1:]  # (B, L-1)
    return nll.masked_fill(~valid, 0.0), valid


def nll(logits: torch.Tensor, input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None) -> tuple[float, int]:
    """Sum of next-token NLL (nats) over valid targets, and their count. Shapes as `token_nll`."""
    values, valid = token_nll(logits, input_ids, attention_mask)
    return float(values.double().sum()), int(valid.sum())


def perplexity(nll_sum: float, count: int) -> float:
    """exp(mean NLL). `count` must be positive."""
    if count <= 0:
        raise ValueError("perplexity of zero tokens")
    return math.exp(nll_sum / count)


def degradation_pct(ppl: float, baseline_ppl: float) -> float:
    """(ppl / baseline_ppl - 1) x 100: positive when the model is worse than the baseline."""
    return (ppl / baseline_ppl - 1.0) * 100.0


def kl_divergence(teacher_logits: torch.Tensor, student_logits: torch.Tensor,
                  attention_mask: torch.Tensor | None = None, temperature: float = 1.0) -> tuple[float, int]:
    """Σ over real positions of KL(p_teacher || p_student) at `temperature`, times T²; and the count.

    Args: teacher_logits, student_logits (B, L, V) (devices may differ); attention_mask (B, L).
    Divide the sum by the count for the mean the report shows.
    """
    vocab = student_logits.shape[-1]
    if teacher_logits.shape[-1] != vocab:
        raise NexusError(f"baseline and model have different vocabularies ({teacher_logits.shape[-1]} vs {vocab} "
                         f"logits); KL and perplexity need the same tokenizer")
    t_flat = teacher_logits.reshape(-1, vocab)  # (B*L, V)
    s_flat = student_logits.reshape(-1, vocab)  # (B*L, V)
    if attention_mask is None:
        rows = torch.arange(s_flat.shape[0], device=s_flat.device)
    else:
        rows = attention_mask.reshape(-1).to(s_flat.device).bool().nonzero().squeeze(1)  # (N,)
    total = torch.zeros((), dtype=torch.float64, device=s_flat.device)
    for chunk in rows.split(KL_CHUNK_ROWS):
        log_t = torch.log_softmax(t_flat[chunk.to(t_flat.device)].to(s_flat.device).float() / temperature, -1)
        log_s = torch.log_softmax(s_flat[chunk].float() / temperature, -1)  # (n, V)
        total += _kl_terms(log_t, log_s).double().sum()
    return float(total) * temperature ** 2, int(rows.numel())


def _kl_terms(log_t: torch.Tensor, log_s: torch.Tensor) -> torch.Tensor:
    """Per-row KL(p_t || p_s) of (n, V) log-probabilities -> (n,)."""
    p_t = log_t.exp()
    # where p_t == 0 the term is 0 (and log_t may be -inf: masked vocabulary entries)
    return torch.where(p_t > 0, p_t * (log_t - log_s), torch.zeros_like(p_t)).sum(-1)


@dataclass
class HeadSums:
    """What the LM heads of a model and its baseline give over one batch (sums, as `Totals` adds them)."""

    kl: float  # Σ KL(baseline || model) × T² over real positions
    positions: int
    nll: float  # Σ next-token NLL over valid targets (model; baseline below); 0 unless perplexity is computed
    baseline_nll: float
    targets: int


def head_sums(hidden: torch.Tensor, head: nn.Module, base_hidden: torch.Tensor, base_head: nn.Module,
              input_ids: torch.Tensor, attention_mask: torch.Tensor, temperature: float = 1.0,
              compute_perplexity: bool = True, chunk_rows: int | None = None) -> HeadSums:
    """KL and both NLLs of one batch from the final hidden states (B, L, H) of a model and its baseline,
    each LM head applied to `chunk_rows` real positions at a time (default: 64 MiB of fp32 logits), so no
    (B, L, V) logits ever exist. Same definitions as `kl_divergence` and `nll`: KL over real positions;
    position t predicts token t + 1 and counts when both are real."""
    b, length = input_ids.shape
    device = head.weight.device
    mask = attention_mask.to(device).bool()  # (B, L)
    valid = torch.zeros_like(mask)
    valid[:, :-1] = mask[:, :-1] & mask[:, 1:]
    targets = torch.zeros_like(mask, dtype=torch.long)
    targets[:, :-1] = input_ids[:, 1:].to(device)
    valid, targets = valid.reshape(-1), targets.reshape(-1)  # (B*L,)
    flat, base_flat = hidden.reshape(b * length, -1), base_hidden.reshape(b * length, -1)
    rows = mask.reshape(-1).nonzero().squeeze(1)  # (N,) real positions
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # KL, NLL, baseline NLL
    for chunk in rows.split(chunk_rows or default_chunk_size(int(head.weight.shape[0]))):
        z = head(flat[chunk.to(flat.device)].to(device)).float()  # (n, V)
        base_z = base_head(base_flat[chunk.to(base_flat.device)].to(base_head.weight.device)).float().to(device)
        log_s, log_t = (torch.log_softmax(x / temperature, -1) for x in (z, base_z))
        sums[0] += _kl_terms(log_t, log_s).double().sum()
        if compute_perplexity:
            v, t = valid[chunk], targets[chunk][valid[chunk]]
            for i, logits in ((1, z), (2, base_z)):
                sums[i] += F.cross_entropy(logits[v], t, reduction="none").double().sum()
    kl, model_nll, base_nll = sums.tolist()
    return HeadSums(kl * temperature ** 2, int(rows.numel()), model_nll, base_nll, int(valid.sum()))


def routing_agreement(indices: torch.Tensor, baseline_indices: torch.Tensor) -> torch.Tensor:
    """|A ∩ B| / k per token, for routed top-k index sets. (T, k), (T, k') -> (T,) fp32, k = max(k, k')."""
    hits = (indices.unsqueeze(-1) == baseline_indices.unsqueeze(-2)).any(-1)  # (T, k)
    return hits.sum(-1).float() / max(indices.shape[-1], baseline_indices.shape[-1])


@dataclass
class Totals:
    """Running sums for one evaluation; `merge` combines datasets (layer figures are token-weighted)."""

    targets: int = 0  # next-token targets counted in the NLL sums
    nll: float = 0.0
    baseline_nll: float = 0.0
    positions: int = 0  # positions counted in the KL sum
    kl: float = 0.0
    perplexity_computed: bool = True
    # layer -> metric -> [sum, count]; metrics: router_entropy, baseline_router_entropy,
    # routing_agreement, shared_norm, routed_norm
    layers: dict = field(default_factory=lambda: defaultdict(lambda: defaultdict(lambda: [0.0, 0])))

    def add(self, layer: int, metric: str, total: float, count: int) -> None:
        entry = self.layers[layer][metric]
        entry[0] += total
        entry[1] += count

    def merge(self, other: "Totals") -> "Totals":
        self.targets += other.targets
        self.nll += other.nll
        self.baseline_nll += other.baseline_nll
        self.positions += other.positions
        self.kl += other.kl
        self.perplexity_computed = self.perplexity_computed and other.perplexity_computed
        for layer, metrics in other.layers.items():
            for metric, (total, count) in metrics.items():
                self.add(layer, metric, total, count)
        return self

    def summary(self) -> dict:
        """{tokens, perplexity, baseline_perplexity, degradation_pct, kl}; perplexities None if not computed."""
        out = {"tokens": self.targets, "perplexity": None, "baseline_perplexity": None, "degradation_pct": None,
               "kl": self.kl / self.positions if self.positions else None}
        if self.perplexity_computed and self.targets:
            ppl, base = perplexity(self.nll, self.targets), perplexity(self.baseline_nll, self.targets)
            out.update(perplexity=ppl, baseline_perplexity=base, degradation_pct=degradation_pct(ppl, base))
        return out

    def layer_summary(self) -> dict[str, dict]:
        """{layer: {router_entropy, baseline_router_entropy, routing_agreement, shared_output_ratio}}."""
        out = {}
        for layer in sorted(self.layers):
            m = self.layers[layer]

            def mean(key):
                total, count = m.get(key, (0.0, 0))
                return total / count if count else None

            shared, routed = m.get("shared_norm", (0.0, 0))[0], m.get("routed_norm", (0.0, 0))[0]
            ratio = shared / routed if m.get("routed_norm", (0, 0))[1] and routed > 0 else None
            out[str(layer)] = {"router_entropy": mean("router_entropy"),
                               "baseline_router_entropy": mean("baseline_router_entropy"),
                               "routing_agreement": mean("routing_agreement"),
                               "shared_output_ratio": ratio}
        return out


def _input_device(model: nn.Module) -> torch.device:
    return model.get_input_embeddings().weight.device


def evaluate(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], baseline: nn.Module | None = None,
             compute_perplexity: bool = True, temperature: float = 1.0,
             progress: Callable[[int], None] | None = None, root: nn.Module | None = None,
             baseline_root: nn.Module | None = None) -> Totals:
    """Run `model` and its baseline on the same batches and accumulate every validation metric.

    Args:
        model: the model under test (usually with NEXUS shared experts attached).
        batches: (input_ids (B, L), attention_mask (B, L)) pairs; 0 in the mask marks padding.
        baseline: a separate baseline model; None runs `model` itself with its shared experts
            switched off (the adapter's own base, without loading a second copy).
        compute_perplexity: accumulate the NLL of both (KL and router metrics are always computed).
        progress: called with the number of real tokens after each batch (sharded: after each round of
            batches, with the round's tokens on every rank).
        root, baseline_root: the FSDP2 roots of a sharded `model` and `baseline` (--shard-base), through
            which every forward runs. Batch i is then measured on rank i mod world size; every rank runs
            as many forwards (a rank out of batches runs the first one again and counts nothing), and the
            sums are combined over the ranks, so every rank returns the totals of all batches.
    """
    same = baseline is None
    if same and not any(hasattr(m, SHARED_NAME) for m in model.modules()):
        raise NexusError("the model has no NEXUS shared experts, so it cannot be its own baseline; give a baseline model")
    blocks = find_moe_blocks(model)
    base_blocks = blocks if same else find_moe_blocks(baseline)
    totals = Totals(perplexity_computed=compute_perplexity)
    state = {"pass": "model", "mask": None, "totals": totals}  # totals: where this batch's figures go
    captured: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
    warned: set[int] = set()  # layers already warned about

    def on_router(which: str | None):
        def fn(layer, logits, weights, indices):  # logits (T, E), indices (T, k)
            captured[(which or state["pass"], layer)] = (logits.detach(), indices.detach())
        return fn

    def on_shared(layer: int):
        def fn(routed, shared):  # (B, L, H) each
            flat_r = routed.reshape(-1, routed.shape[-1]).float()  # (T, H)
            flat_s = shared.reshape(-1, shared.shape[-1]).float()
            flat_r = real_tokens(flat_r, state["mask"], layer, "MoE block output")
            flat_s = real_tokens(flat_s, state["mask"], layer, "shared expert output")
            state["totals"].add(layer, "routed_norm", float(flat_r.norm(dim=-1).double().sum()), flat_r.shape[0])
            state["totals"].add(layer, "shared_norm", float(flat_s.norm(dim=-1).double().sum()), flat_s.shape[0])
        return fn

    head, base_head = lm_head_of(model), lm_head_of(model if same else baseline)
    if not same and vocab_size(baseline) != vocab_size(model):
        raise NexusError(f"baseline and model have different vocabularies ({vocab_size(baseline)} vs "
                         f"{vocab_size(model)} logits); KL and perplexity need the same tokenizer")
    check_head_split(model, _input_device(model), root)  # the logits are lm_head(hidden states)
    if not same:
        check_head_split(baseline, _input_device(baseline), baseline_root)
    modes = [(m, m.training) for m in ([model] if same else [model, baseline])]
    with contextlib.ExitStack() as stack:
        if same:
            stack.enter_context(router_hooks(model, on_router(None), blocks))
        else:
            stack.enter_context(router_hooks(model, on_router("model"), blocks))
            stack.enter_context(router_hooks(baseline, on_router("baseline"), base_blocks))
        for b in blocks:
            if hasattr(b.block, SHARED_NAME):
                stack.enter_context(recording_shared_output(b.block, on_shared(b.layer)))
        for m, _ in modes:
            m.eval()
        stack.callback(lambda: [m.train(flag) for m, flag in modes])
        with torch.inference_mode():
            for input_ids, attention_mask, counted, tokens in _share(batches, root is not None):
                t = totals if counted else Totals(perplexity_computed=compute_perplexity)  # else discarded
                state["totals"] = t
                captured.clear()
                mask = attention_mask.bool()  # (B, L)
                state["mask"] = mask.reshape(-1)  # (T,), T = B*L in row-major order, as the routers see it
                state["pass"] = "baseline"
                if same:
                    with shared_experts_disabled(model):
                        base_hidden = _hidden(model, input_ids, attention_mask, root)  # (B, L, H)
                else:
                    base_hidden = _hidden(baseline, input_ids, attention_mask, baseline_root)
                state["pass"] = "model"
                hidden = _hidden(model, input_ids, attention_mask, root)  # (B, L, H)
                sums = head_sums(hidden, head, base_hidden, base_head, input_ids, attention_mask, temperature,
                                 compute_perplexity)
                del base_hidden, hidden
                t.kl += sums.kl
                t.positions += sums.positions
                t.nll += sums.nll
                t.baseline_nll += sums.baseline_nll
                t.targets += sums.targets
                _router_metrics(t, captured, state["mask"], warned)
                if progress is not None and tokens:
                    progress(tokens)
    return _over_ranks(totals) if root is not None else totals


def _share(batches: Iterable[tuple[torch.Tensor, torch.Tensor]], sharded: bool):
    """(input_ids, attention_mask, counted, tokens to report) for each forward this rank runs.

    One process: every batch, counted. Sharded: round r gives batch r × world + rank to this rank; a
    rank past the last batch runs the first batch again, not counted; tokens are the whole round's.
    """
    if not sharded:
        for ids, mask in batches:
            yield ids, mask, True, int(mask.sum())
        return
    batches, world, rank = list(batches), dist.world_size(), dist.rank()
    for r in range(0, len(batches), world):
        round_ = batches[r:r + world]
        tokens = sum(int(m.sum()) for _, m in round_)
        yield (*round_[rank], True, tokens) if rank < len(round_) else (*batches[0], False, tokens)


def _over_ranks(totals: Totals) -> Totals:
    """The totals of all ranks, combined in rank order (every rank calls this)."""
    plain = replace(totals, layers={layer: {k: list(v) for k, v in m.items()} for layer, m in totals.layers.items()})
    out = Totals(perplexity_computed=totals.perplexity_computed)
    for part in dist.all_gather_object(plain):  # the layers' defaultdicts do not pickle; plain dicts do
        out.merge(part)
    return out


def real_tokens(x: torch.Tensor, mask: torch.Tensor, layer: int, what: str) -> torch.Tensor:
    """The rows of x (T, ...) that are real tokens: mask (T,) bool, T = B*L in row-major order.

    A block that saw another number of tokens than the batch holds is an error, never a silent
    fallback to counting padding.
    """
    if mask.numel() != x.shape[0]:
        raise NexusError(f"layer {layer}: the {what} has {x.shape[0]} token rows but the batch has {mask.numel()} "
                         f"positions, so padding cannot be left out of the validation metrics")
    return x[mask.to(x.device)]


def _hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
            root: nn.Module | None = None) -> torch.Tensor:
    """The final hidden states (B, L, H) of `model`, through its FSDP2 root when sharded (whose LM head
    then stays gathered after the forward)."""
    device = _input_device(model)
    if root is not None:
        return root(input_ids.to(device), attention_mask.to(device))
    return hidden_states(backbone_of(model), input_ids.to(device), attention_mask.to(device))


def _router_metrics(totals: Totals, captured: dict, mask: torch.Tensor, warned: set) -> None:
    """Add per-layer entropy and agreement of one batch; `mask` (T,) selects real tokens."""
    layers = sorted({layer for _, layer in captured})
    for layer in layers:
        for which, key in (("model", "router_entropy"), ("baseline", "baseline_router_entropy")):
            if (which, layer) in captured:
                logits, _ = captured[(which, layer)]  # (T, E)
                ent = entropy(router_probs(real_tokens(logits, mask, layer, f"{which} router logits")))  # (N,)
                totals.add(layer, key, float(ent.double().sum()), ent.numel())
        if ("model", layer) in captured and ("baseline", layer) in captured:
            (m_logits, m_idx), (b_logits, b_idx) = captured[("model", layer)], captured[("baseline", layer)]
            if m_logits.shape[-1] != b_logits.shape[-1]:
                if layer not in warned:
                    warned.add(layer)
                    log.warning(f"warning: layer {layer}: the model routes over {m_logits.shape[-1]} experts, the "
                                f"baseline over {b_logits.shape[-1]}; no routing agreement for this layer")
                continue
            m_idx = real_tokens(m_idx, mask, layer, "model routing")
            b_idx = real_tokens(b_idx.to(m_idx.device), mask, layer, "baseline routing")
            agree = routing_agreement(m_idx, b_idx)  # (N,)
            totals.add(layer, "routing_agreement", float(agree.double().sum()), agree.numel())
