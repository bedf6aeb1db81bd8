"""Helpers of benchmarks/study.py: data split, router statistics, adapters, the methods' models, the
plateau stopping rule, the FLOPs formula, and one training run per (method, learning rate, seed).

Every method trains on the same stream of domain batches for a seed (nexus.stream, the Trainer's own
data order), with the same loss, CE + kl_weight × T² × KL(base ‖ model at T), AdamW, linear warmup over
10 % of --max-steps then a constant learning rate, gradient clipping at 1.0; NEXUS through the library's
Trainer, the others through `run_custom`, which mirrors it. Every run is scored by
nexus.validate.metrics.evaluate against one frozen copy of the base model.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from nexus.base.loader import load_base_model
from nexus.data import load_tokenizer
from nexus.validate.core import batches, sequences
from study_report import trend_drop

TEMPERATURE = 2.0  # TrainConfig's default distillation temperature, used by every method here
ALL = 10 ** 12  # "every sequence" for nexus.validate.core.sequences


# ------------------------------------------------------------------------------------------ data, stats
def split_train_val(domain_train: str, root: Path, val_frac: float) -> tuple[str, str]:
    """domain_train's JSONL lines cut in two: the last `val_frac` of the documents (at least one) are the
    validation slice of the stopping rule, the rest is what every method trains on (written once)."""
    train, val = root / "data" / "domain_train_fit.jsonl", root / "data" / "domain_train_val.jsonl"
    if not (train.is_file() and val.is_file()):
        lines = [ln for ln in Path(domain_train).read_text().splitlines() if ln.strip()]
        n_val = max(1, round(val_frac * len(lines)))
        if n_val >= len(lines):
            raise SystemExit(f"--domain-train {domain_train}: {len(lines)} documents, too few to hold out {n_val}")
        train.parent.mkdir(parents=True, exist_ok=True)
        train.write_text("\n".join(lines[:-n_val]) + "\n")
        val.write_text("\n".join(lines[-n_val:]) + "\n")
    return str(train), str(val)


def router_stats(model: str, dataset: str, out: Path, tokens: int, seq_len: int, hidden_tokens: int = 0) -> Path:
    """`nexus collect` on the domain training part, run once (skipped when the file exists); with
    `hidden_tokens`, also a sample of that many tokens' hidden states (`--keep-raw N --keep-hidden`)."""
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        sample = ["--keep-raw", str(hidden_tokens), "--keep-hidden"] if hidden_tokens else []
        subprocess.run([sys.executable, "-m", "nexus", "collect", "--model", model, "--dataset", dataset,
                        "--output", str(out), "--target-tokens", str(tokens), "--seq-len", str(seq_len),
                        "--batch-size", "16", "--device", "cpu", *sample], check=True, stdout=subprocess.DEVNULL)
    return out


def ranks_units(init: str) -> bool:
    """Whether convert keeps a subset of the merged experts' hidden units at width 1 (feature_topK /
    pruned_topK, K > 1): the inits a --hidden-sample changes."""
    from nexus.convert.strategy import parse_strategy, ranks_units as keeps_some

    return keeps_some(parse_strategy(init), 1)


def selection(stats_path: Path, root: Path, top_k: int, importance: str = "pca") -> Path:
    """A pca_stats.json from `nexus.stats.analyze` (`importance` ranking: "pca" or "frequency"; importance
    weights), as `nexus analyze --importance IMPORTANCE`."""
    from nexus.stats.accumulate import RouterStats
    from nexus.stats.analyze import analyze_stats

    out = root / "stats" / (f"top{top_k}.json" if importance == "pca" else f"{importance}-top{top_k}.json")
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        stats, _ = RouterStats.load(stats_path)
        out.write_text(json.dumps(analyze_stats(stats, top_k, importance, merge_weights="importance"), indent=1))
    return out


def init_top_k(init: str) -> int | None:
    """8 for "pca_top8"; None for inits that read no expert ("random", "zero")."""
    m = re.search(r"_top(\d+)$", init)
    return int(m.group(1)) if m else None


def adapter(model: str, root: Path, init: str, stats: Path | None, seed: int, hidden_sample: Path | None = None) -> str:
    """`nexus convert --init-strategy INIT` of the model into root/adapters/INIT-sSEED (reused when present);
    `hidden_sample` (--hidden-sample) for the inits that rank hidden units (then INIT-act-sSEED)."""
    from nexus.convert.core import convert

    sample = hidden_sample if hidden_sample is not None and ranks_units(init) else None
    out = root / "adapters" / (f"{init}-act-s{seed}" if sample else f"{init}-s{seed}")
    if not (out / "nexus_config.json").is_file():
        with contextlib.redirect_stdout(io.StringIO()):
            convert(model, str(out), init, pca_stats=str(stats) if stats else None, seed=seed, overwrite=True,
                    log=lambda *a, **k: None, hidden_sample=str(sample) if sample else None)
    return str(out)


# ------------------------------------------------------------------------------------ pure rules (tested)
class Plateau:
    """Early stopping: `update(loss)` after each evaluation; `stop` says when to end. Two rules:

    - patience (`window` 0): stop once the loss has not improved on the best by more than `min_delta` for
      `patience` evaluations in a row;
    - trend (`window` w >= 3): stop once the least-squares line through the last w losses falls by less
      than `min_delta` across them (`trend_drop`). Under a constant learning rate the loss moves from one
      evaluation to the next by more than it improves per evaluation late in training, so the patience rule
      stops on a noisy evaluation while the loss is still falling; a line through many evaluations does not.

    `improved` says whether the last update set a new best (the checkpoint to keep): under the patience
    rule by more than `min_delta`, under the trend rule any new lowest loss."""

    def __init__(self, patience: int, min_delta: float, window: int = 0):
        if window and window < 3:
            raise ValueError(f"trend window must be at least 3 evaluations, got {window}")
        self.patience, self.min_delta, self.window = patience, min_delta, window
        self.best, self.bad, self.improved = math.inf, 0, False
        self.losses: list[float] = []

    def update(self, loss: float) -> bool:
        self.losses.append(loss)
        self.improved = loss < self.best - (0.0 if self.window else self.min_delta)
        if self.improved:
            self.best, self.bad = loss, 0
        else:
            self.bad += 1
        return self.stop

    @property
    def stop(self) -> bool:
        if self.window:
            drop = trend_drop(self.losses, self.window)
            return drop is not None and drop < self.min_delta
        return self.bad >= self.patience


def active_params(model) -> dict[str, int]:
    """{total, embedding, experts, active}: parameters read per token at inference. Input embeddings are a
    lookup (not counted); each MoE layer's routed experts count at top_k / num_experts of their size;
    everything else (attention, norms, routers, LM head) counts fully."""
    from nexus.moe import find_moe_blocks

    cfg = model.config
    k = getattr(cfg, "num_experts_per_tok", None) or getattr(cfg, "moe_topk", None)
    total = sum(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings().weight.numel()
    experts, active_experts = 0, 0.0
    for b in find_moe_blocks(model):
        n = sum(p.numel() for p in b.experts.parameters())
        e = b.layout.num_experts
        experts += n
        active_experts += n * k / e
    return {"total": total, "embedding": emb, "experts": experts,
            "active": int(round(total - emb - experts + active_experts))}


def flops_per_token(active: int, added: int = 0) -> int:
    """Inference FLOPs per token: 2 × active parameters, plus 2 × the parameters a method adds to every
    token's path (NEXUS: its always-on shared experts, all layers; merged LoRA, ESFT, full-moe: 0)."""
    return 2 * (active + added)


# ---------------------------------------------------------------------------------------------- models
def nexus_param_count(model: str) -> int:
    """Parameters of NEXUS's shared experts at width 1× (all MoE layers), without converting."""
    from nexus.shared import SHARED_NAME, attach_shared_experts

    m = load_base_model(model, dtype=torch.float32)
    attach_shared_experts(m, init="zero")
    return sum(p.numel() for n, p in m.named_parameters() if SHARED_NAME in n)


LORA_ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
LORA_EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]  # GPT-OSS's fused expert tensors


def lora_model(model: str, rank: int, experts: bool):
    """PEFT LoRA on attention q/k/v/o, and with `experts` on the fused expert weights (`target_parameters`)."""
    from peft import LoraConfig, get_peft_model

    base = load_base_model(model, dtype=torch.float32)
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=LORA_ATTN,
                     **({"target_parameters": LORA_EXPERTS} if experts else {}))
    return get_peft_model(base, cfg)


def lora_rank_for(model: str, target: int, experts: bool) -> int:
    """The LoRA rank whose trainable-parameter count is closest to `target` (the count is linear in r)."""
    def count(r):
        return sum(p.numel() for p in lora_model(model, r, experts).parameters() if p.requires_grad)

    c1, c2 = count(1), count(2)
    return max(1, round((target - (2 * c1 - c2)) / (c2 - c1)))


def esft_choice(stats_path: Path, threshold: float | None = None, per_layer: int | None = None) -> dict[int, list[int]]:
    """ESFT's token-share selection from the router statistics: per layer the routed experts with the
    highest share of routed (top-k) tokens, taken in that order until their cumulative share reaches
    `threshold`, or exactly `per_layer` of them."""
    from nexus.stats.accumulate import RouterStats

    stats, _ = RouterStats.load(stats_path)
    out = {}
    for layer, sums in stats.sums.items():
        share = sums["topk_count"].double()
        share = share / share.sum()
        order = torch.argsort(share, descending=True, stable=True)
        if per_layer is None:
            cum = torch.cumsum(share[order], 0)
            n = int((cum < threshold - 1e-12).sum()) + 1
        else:
            n = per_layer
        out[int(layer)] = order[:n].tolist()
    return out


class SliceDelta(torch.nn.Module):
    """Parametrization of a fused expert tensor (E, ...): the frozen base plus a trainable delta for the
    chosen experts only (index_add into their slices), so the trained experts are their own parameters."""

    def __init__(self, idx: list[int], like: torch.Tensor):
        super().__init__()
        self.register_buffer("idx", torch.tensor(idx, dtype=torch.long))
        self.delta = torch.nn.Parameter(torch.zeros(len(idx), *like.shape[1:], dtype=like.dtype))

    def forward(self, w):
        return w.index_add(0, self.idx, self.delta)


def esft_model(model: str, chosen: dict[int, list[int]]):
    """ESFT: the chosen experts of each layer are split out as their own trainable tensors (SliceDelta on
    each fused expert tensor); every base weight stays frozen, so gradients and AdamW state exist for the
    chosen experts only. Returns (model, trainable count)."""
    from torch.nn.utils import parametrize

    from nexus.moe import find_moe_blocks

    m = load_base_model(model, dtype=torch.float32)
    for p in m.parameters():
        p.requires_grad_(False)
    for b in find_moe_blocks(m):
        for name, p in list(b.experts.named_parameters(recurse=False)):
            parametrize.register_parametrization(b.experts, name, SliceDelta(chosen[b.layer], p))
    m.nexus_study_source = model  # merged() rebuilds a plain copy from it
    return m, sum(p.numel() for p in m.parameters() if p.requires_grad)


def merged(model):
    """A plain copy of `model` for scoring: PEFT LoRA merged; for ESFT a fresh base with the split-out
    experts written back into their slices (a parametrized model is not deep-copied: the copy would share
    its parametrization registry)."""
    import copy

    from torch.nn.utils import parametrize

    from nexus.moe import find_moe_blocks

    if hasattr(model, "merge_and_unload"):
        return copy.deepcopy(model).merge_and_unload()
    if not any(parametrize.is_parametrized(m) for m in model.modules()):
        return model
    plain = load_base_model(model.nexus_study_source, dtype=torch.float32).eval()
    with torch.no_grad():
        for b, pb in zip(find_moe_blocks(model), find_moe_blocks(plain)):
            for name in b.experts.parametrizations:
                getattr(pb.experts, name).copy_(getattr(b.experts, name))
    return plain


def full_moe_model(model: str):
    """Every MoE layer's routed experts and router train; attention, norms, embeddings stay frozen."""
    from nexus.moe import find_moe_blocks

    m = load_base_model(model, dtype=torch.float32)
    for p in m.parameters():
        p.requires_grad_(False)
    for b in find_moe_blocks(m):
        for p in list(b.experts.parameters()) + list(b.router.parameters()):
            p.requires_grad_(True)
    return m, sum(p.numel() for p in m.parameters() if p.requires_grad)


# ------------------------------------------------------------------------------------------ evaluation
class Evaluator:
    """Every packed sequence of domain_eval and general_eval (or the first `num`), the validation slice,
    and one frozen base model as the reference and the teacher of the custom methods."""

    def __init__(self, model: str, data: dict, seq_len: int, num: int | None = None, val_num: int | None = None,
                 batch_size: int = 8):
        self.tok = load_tokenizer(model)
        self.base = load_base_model(model, dtype=torch.float32).eval()
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.seqs = {name: sequences(data[f"{name}_eval"], self.tok, seq_len, num or ALL, packed=True)
                     for name in ("domain", "general")}
        self.val = sequences(data["domain_val"], self.tok, seq_len, val_num or ALL, packed=True)
        # general text seen by neither pretraining nor the scoring (testbed_data's general_val), if given
        self.general_val = (sequences(data["general_val"], self.tok, seq_len, ALL, packed=True)
                            if data.get("general_val") else None)
        self.batch_size = batch_size
        self._base_general_val: float | None = None

    def tokens(self) -> dict[str, int]:
        """Predicted tokens per split (seq_len - 1 per packed sequence)."""
        out = {k: sum(len(s) - 1 for s in v) for k, v in self.seqs.items()}
        out["val"] = sum(len(s) - 1 for s in self.val)
        if self.general_val is not None:
            out["general_val"] = sum(len(s) - 1 for s in self.general_val)
        return out

    @torch.no_grad()
    def loss(self, model, seqs) -> tuple[float, int]:
        """(mean next-token cross-entropy in nats, predicted tokens) of `model` on packed `seqs`."""
        was = model.training
        model.eval()
        nll, n = 0.0, 0
        for ids, mask in batches(seqs, self.batch_size, self.tok.pad_token_id):
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            tgt = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="sum"))
            n += int((tgt != -100).sum())
        model.train(was)
        return nll / n, n

    def val_loss(self, model) -> float:
        """Mean next-token cross-entropy (nats) of `model` on the validation slice."""
        return self.loss(model, self.val)[0]

    def general_change(self, model) -> float:
        """% change of `model`'s loss on the general validation text against the frozen base's (taken once)."""
        if self._base_general_val is None:
            self._base_general_val = self.loss(self.base, self.general_val)[0]
        return 100.0 * (self.loss(model, self.general_val)[0] - self._base_general_val) / self._base_general_val

    def __call__(self, model, baseline: bool = True) -> dict:
        """{domain_loss, general_loss, base_domain_loss, base_general_loss (nats/token), *_ppl, *_kl, tokens};
        without `baseline` only the model's own {domain,general}_{loss,ppl,tokens} (half the forwards: the
        frozen base's figures are the same in every run, taken once at step 0)."""
        from nexus.validate.metrics import evaluate

        model = merged(model)  # PEFT and ESFT: a plain copy (the MoE hooks need plain modules)
        if not baseline:
            out = {}
            for name, seqs in self.seqs.items():
                loss, n = self.loss(model, seqs)
                out.update({f"{name}_loss": loss, f"{name}_ppl": math.exp(loss), f"{name}_tokens": n})
            return out
        was = model.training
        model.eval()
        out = {}
        for name, seqs in self.seqs.items():
            s = evaluate(model, batches(seqs, self.batch_size, self.tok.pad_token_id), baseline=self.base).summary()
            out.update({f"{name}_ppl": s["perplexity"], f"{name}_kl": s["kl"], f"base_{name}_ppl": s["baseline_perplexity"],
                        f"{name}_loss": math.log(s["perplexity"]), f"base_{name}_loss": math.log(s["baseline_perplexity"]),
                        f"{name}_tokens": s["tokens"]})
        model.train(was)
        return out


def rss_mib() -> float:
    """Peak resident set size of this process so far (ru_maxrss, KiB on Linux), in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------------------------------- training
def _loop(step_fn, params: list, model, ev: Evaluator, max_steps: int, eval_every: int, patience: int,
          min_delta: float, trend_window: int = 0, general=None, max_general: float = 5.0) -> dict:
    """Train with `step_fn(step)` until the validation loss plateaus (Plateau) or max_steps; the trainable
    parameters end at their best-validation values. Returns the run's training record.

    With `general` (model -> % change of the general validation loss against the base's), each evaluation
    also measures it, and the record's `selected` is the evaluation with the lowest domain validation loss
    among those whose change is under `max_general` % (`selected_params` holds its values; None if no
    evaluation, step 0 included, qualified): the checkpoint a user who must keep general text within the
    limit would keep."""
    rule = Plateau(patience, min_delta, trend_window)
    rule.update(ev.val_loss(model))
    best = [p.detach().clone() for p in params]
    best_step, curve, times, losses, step, val_s = 0, [(0, rule.best)], [], [], 0, []
    general_curve, selected, selected_params, general_s = [], None, None, []

    def consider(step: int, v: float) -> None:
        nonlocal selected, selected_params
        if general is None:
            return
        t0 = time.perf_counter()
        g = general(model)
        general_s.append(time.perf_counter() - t0)
        general_curve.append((step, g))
        if g < max_general and (selected is None or v < selected["val_loss"]):
            selected = {"step": step, "val_loss": v, "general_val_change": g}
            selected_params = [p.detach().clone() for p in params]

    consider(0, rule.best)
    while step < max_steps and not rule.stop:
        t0 = time.perf_counter()
        losses.append(step_fn(step))
        times.append(time.perf_counter() - t0)
        step += 1
        if step % eval_every == 0 or step == max_steps:
            t0 = time.perf_counter()
            v = ev.val_loss(model)
            val_s.append(time.perf_counter() - t0)
            consider(step, v)
            curve.append((step, v))
            rule.update(v)
            if rule.improved:
                best, best_step = [p.detach().clone() for p in params], step
    with torch.no_grad():
        for p, b in zip(params, best):
            p.copy_(b)
    rec = {"steps": step, "best_step": best_step, "best_val_loss": rule.best, "val_curve": curve,
           "step_s": statistics.median(times) if times else None, "train_loss": losses,
           "val_eval_s": statistics.median(val_s) if val_s else None,
           "stopped": "plateau" if rule.stop else "max_steps"}
    if general is not None:
        rec.update(general_val_curve=general_curve, max_general=max_general, selected=selected,
                   selected_params=selected_params, general_val_eval_s=statistics.median(general_s))
    return rec


def _score(rec: dict, params: list, model, ev: Evaluator) -> dict:
    """Score the model (at its best-validation values) on the full held-out splits -> the run's `end`; with a
    `selected` checkpoint, score that too (its `end`); `selected_params` leaves the record."""
    t0 = time.perf_counter()
    end = ev(model, baseline=False)
    rec["eval_s"] = time.perf_counter() - t0
    sel, values = rec.get("selected"), rec.pop("selected_params", None)
    if sel is not None:
        if sel["step"] == rec["best_step"]:
            sel["end"] = end
        else:
            with torch.no_grad():
                for p, v in zip(params, values):
                    p.copy_(v)
            sel["end"] = ev(model, baseline=False)
    return end


def run_nexus(adapter_dir: str, data: dict, ev: Evaluator, root: Path, tag: str, lr: float, seed: int,
              start: dict | None = None, train_router: bool = False, kl_weight: float = 1.0, batch: int = 8, seq_len: int = 128,
              max_steps: int = 1000, eval_every: int = 20, patience: int = 3, min_delta: float = 0.0,
              trend_window: int = 0, max_general: float = 5.0, replay_weight: float = 1.0) -> dict:
    """NEXUS: the library's Trainer on the adapter, until the validation loss plateaus (with data["replay"]:
    its --replay-dataset, one micro-batch per step)."""
    import shutil

    from nexus.train.config import TrainConfig
    from nexus.train.recipe import Trainer

    out = root / "runs" / tag
    shutil.rmtree(out, ignore_errors=True)
    cfg = TrainConfig(student_model=adapter_dir, dataset=data["domain_train"], output_dir=str(out), seq_len=seq_len,
                      batch_size=batch, max_steps=max_steps, learning_rate=lr, seed=seed, kl_weight=kl_weight,
                      temperature=TEMPERATURE, freeze_router=not train_router, checkpoint_interval=10 ** 9,
                      logging_steps=10 ** 9, device="cpu", replay_dataset=data.get("replay"),
                      replay_weight=replay_weight)
    trainer = Trainer(cfg)
    trainer.setup()
    start = start or ev(trainer.model)  # step 0 depends on the adapter only: the caller may pass it
    params = trainer.params.params

    def step_fn(_step):
        return trainer.train_step()["loss"]

    rec = _loop(step_fn, params, trainer.model, ev, max_steps, eval_every, patience, min_delta, trend_window,
                ev.general_change if ev.general_val is not None else None, max_general)
    end = _score(rec, params, trainer.model, ev)
    n = trainer.params.numel()
    trainer.cleanup()
    shutil.rmtree(out, ignore_errors=True)
    return {"start": start, "end": end, "trainable": n, "rss_mib": rss_mib(), **rec}


def replay_kl(logits, teacher, mask):  # logits, teacher (B, L, V); mask (B, L)
    """T² × KL(teacher ‖ model) at T = TEMPERATURE, a mean over the target positions: the Trainer's KL term
    (on the domain batch and on the replayed one)."""
    keep = (mask[:, :-1] * mask[:, 1:]).reshape(-1).bool()
    lg = logits[:, :-1].float().reshape(-1, logits.shape[-1])[keep]
    tg = teacher[:, :-1].float().reshape(-1, teacher.shape[-1])[keep]
    t = TEMPERATURE
    return t * t * F.kl_div(F.log_softmax(lg / t, -1), F.log_softmax(tg / t, -1), log_target=True,
                            reduction="none").sum(-1).mean()


def replay_batches(path: str, tok, seq_len: int, seed: int, batch: int):
    """step -> (ids, mask) of the replayed text: the Trainer's --replay-dataset order (seed + 1, one micro-batch
    per step), so every method replays the same sequences."""
    from nexus.stream import DataSpec, SequenceStream, StepLayout, build_sequences, trim_padding

    stream = SequenceStream(build_sequences(DataSpec(path, seq_len=seq_len, seed=seed), tok), seed + 1)
    layout = StepLayout(batch)
    return lambda step: trim_padding(*stream.batch(layout.positions(step, 0, 0)))


def _kd_loss(logits, teacher, ids, mask, kl_weight):  # logits, teacher (B, L, V); ids, mask (B, L)
    keep = (mask[:, :-1] * mask[:, 1:]).reshape(-1).bool()
    lg = logits[:, :-1].float().reshape(-1, logits.shape[-1])[keep]
    loss = F.cross_entropy(lg, ids[:, 1:].reshape(-1)[keep])
    if kl_weight:
        loss = loss + kl_weight * replay_kl(logits, teacher, mask)
    return loss


def run_custom(kind: str, model_dir: str, data: dict, ev: Evaluator, lr: float, seed: int, start: dict | None = None,
               rank: int = 1,
               chosen: dict | None = None, kl_weight: float = 1.0, batch: int = 8, seq_len: int = 128,
               max_steps: int = 1000, eval_every: int = 20, patience: int = 3, min_delta: float = 0.0,
               trend_window: int = 0, max_general: float = 5.0, replay_weight: float = 1.0) -> dict:
    """LoRA (kind lora-attn / lora-attn-experts), ESFT or full-moe on the Trainer's data stream, with the
    Trainer's loss, AdamW (no weight decay), warmup (10 % of max_steps, then constant) and clipping; with
    data["replay"], the Trainer's replay term on the same replayed sequences."""
    from nexus.stream import DataSpec, SequenceStream, StepLayout, build_sequences, trim_padding

    torch.manual_seed(seed)
    extra = {}
    if kind.startswith("lora"):
        model = lora_model(model_dir, rank, experts=kind == "lora-attn-experts")
        extra["rank"] = rank
    elif kind.startswith("esft"):
        model, _ = esft_model(model_dir, {int(k): v for k, v in chosen.items()})
        extra["experts"] = chosen
        extra["memory_split"] = True
    elif kind == "full-moe":
        model, _ = full_moe_model(model_dir)
    else:
        raise ValueError(kind)
    params = [p for p in model.parameters() if p.requires_grad]
    n = sum(p.numel() for p in params)
    stream = SequenceStream(build_sequences(DataSpec(data["domain_train"], seq_len=seq_len, seed=seed), ev.tok), seed)
    layout = StepLayout(batch)
    replay = replay_batches(data["replay"], ev.tok, seq_len, seed, batch) if data.get("replay") else None
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, round(0.1 * max_steps))
    start = start or ev(model)  # step 0 is the base model for every custom method: the caller may pass it
    model.train()

    def step_fn(step):
        ids, mask = trim_padding(*stream.batch(layout.positions(step, 0, 0)))
        with torch.no_grad():
            teacher = ev.base(input_ids=ids, attention_mask=mask).logits if kl_weight else None
        loss = _kd_loss(model(input_ids=ids, attention_mask=mask).logits, teacher, ids, mask, kl_weight)
        loss.backward()
        if replay is not None:
            ids, mask = replay(step)
            with torch.no_grad():
                teacher = ev.base(input_ids=ids, attention_mask=mask).logits
            kl = replay_weight * replay_kl(model(input_ids=ids, attention_mask=mask).logits, teacher, mask)
            kl.backward()
            loss = loss + kl.detach()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / warmup)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    rec = _loop(step_fn, params, model, ev, max_steps, eval_every, patience, min_delta, trend_window,
                ev.general_change if ev.general_val is not None else None, max_general)
    end = _score(rec, params, model, ev)
    return {"start": start, "end": end, "trainable": n, "rss_mib": rss_mib(), **rec, **extra}


# ------------------------------------------------------------------------------------------ processes
def isolated(kwargs: dict) -> dict:
    """run_one(**kwargs) in a fresh interpreter so ru_maxrss is that run's own peak."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(run_one, (kwargs,))


def run_one(kw: dict) -> dict:
    """One (method, lr, seed) run from plain arguments (picklable): loads its own Evaluator."""
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    kw = dict(kw)
    data, model_dir, method = kw.pop("data"), kw.pop("model"), kw.pop("method")
    ev = Evaluator(model_dir, data, kw["seq_len"], kw.pop("eval_num"), kw.pop("val_num"))
    rss0 = rss_mib()
    if method.startswith("nexus"):
        res = run_nexus(kw.pop("adapter_dir"), data, ev, Path(kw.pop("root")), kw.pop("tag"), **kw)
    else:
        kw.pop("root"), kw.pop("tag"), kw.pop("adapter_dir", None)
        res = run_custom(kw.pop("kind"), model_dir, data, ev, **kw)
    res["rss_before_mib"] = rss0
    res["eval_tokens"] = ev.tokens()
    return res


def find_blocks(model):
    from nexus.moe import find_moe_blocks

    return find_moe_blocks(model)
