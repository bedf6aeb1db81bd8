"""Helpers of benchmarks/study.py: router statistics once, adapters, and one training run per method.

Every method trains on the same stream of domain batches (nexus.stream, the Trainer's own data
order for a seed) with the same loss, CE + kl_weight × T² × KL(base ‖ model at T), and is scored by
nexus.validate.metrics.evaluate against one frozen copy of the base model.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from nexus import demo_data
from nexus.base.loader import load_base_model
from nexus.data import load_tokenizer
from nexus.validate.core import batches, sequences

MODEL = str(demo_data.DEMO_MODEL_DIR)
TEMPERATURE = 2.0  # TrainConfig's default distillation temperature, used by every method here
LR = 1e-3  # the demo config's learning rate, used by every method here


def write_data(root: Path) -> dict[str, str]:
    """The demo corpus splits as JSONL under root/data (written once)."""
    out = {}
    for split in demo_data.SPLITS:
        path = root / "data" / f"{split}.jsonl"
        if not path.is_file():
            demo_data.write_split(split, path)
        out[split] = str(path)
    return out


def router_stats(root: Path, data: dict, tokens: int) -> Path:
    """`nexus collect` on the domain training split, run once (skipped when the file exists)."""
    out = root / "router_stats.safetensors"
    if not out.is_file():
        subprocess.run([sys.executable, "-m", "nexus", "collect", "--model", MODEL, "--dataset",
                        data["domain_train"], "--output", str(out), "--target-tokens", str(tokens),
                        "--seq-len", "256", "--batch-size", "16", "--device", "cpu"], check=True,
                       stdout=subprocess.DEVNULL)
    return out


def selection(stats_path: Path, root: Path, name: str, top_k: int, importance: str, weights: str) -> Path:
    """A pca_stats.json from `nexus.stats.analyze` (the analyze stage, without plots)."""
    from nexus.stats.accumulate import RouterStats
    from nexus.stats.analyze import analyze_stats

    out = root / "stats" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    stats, _ = RouterStats.load(stats_path)
    out.write_text(json.dumps(analyze_stats(stats, top_k, importance, merge_weights=weights), indent=1))
    return out


def uniform_selection(template: Path, root: Path) -> Path:
    """A hand-made pca_stats.json: every expert of every layer, equal weights (uniform average)."""
    stats = json.loads(template.read_text())
    n = stats["num_experts"]
    layers = {k: {"selected_experts": list(range(n)), "weights": [1.0 / n] * n} for k in stats["layers"]}
    out = root / "stats" / "uniform_all.json"
    out.write_text(json.dumps({"format": "nexus-pca-stats", "version": 1, "num_experts": n, "layers": layers}))
    return out


def adapter(root: Path, name: str, strategy: str, stats: Path | None, seed: int, width: int | None = None) -> str:
    """`nexus convert` of the demo model into root/adapters/NAME-sSEED (reused when present)."""
    from nexus.convert.core import convert

    out = root / "adapters" / f"{name}-s{seed}"
    if not (out / "nexus_config.json").is_file():
        with contextlib.redirect_stdout(io.StringIO()):
            convert(MODEL, out, strategy, pca_stats=str(stats) if stats else None, width_multiplier=width,
                    seed=seed, overwrite=True, log=lambda *a, **k: None)
    return str(out)


class Evaluator:
    """Fixed evaluation sequences of each split and one frozen base model as the reference."""

    def __init__(self, data: dict, num: int, seq_len: int, batch_size: int = 8):
        self.tok = load_tokenizer(MODEL)
        self.base = load_base_model(MODEL, dtype=torch.float32).eval()
        self.seqs = {name: sequences(data[f"{name}_eval"], self.tok, seq_len, num, packed=True)
                     for name in ("domain", "general")}
        self.batch_size = batch_size

    def __call__(self, model) -> dict:
        """{domain_ppl, general_ppl, domain_kl, general_kl, base_domain_ppl, base_general_ppl}."""
        import copy

        from nexus.validate.metrics import evaluate

        if hasattr(model, "merge_and_unload"):  # PEFT: score a merged copy (the MoE hooks need plain modules)
            model = copy.deepcopy(model).merge_and_unload()

        out = {}
        for name, seqs in self.seqs.items():
            s = evaluate(model, batches(seqs, self.batch_size, self.tok.pad_token_id), baseline=self.base).summary()
            out.update({f"{name}_ppl": s["perplexity"], f"{name}_kl": s["kl"],
                        f"base_{name}_ppl": s["baseline_perplexity"]})
        return out


def rss_mib() -> float:
    """Peak resident set size of this process so far (ru_maxrss, KiB on Linux), in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_nexus(adapter_dir: str, data: dict, ev: Evaluator, root: Path, tag: str, steps: int, seed: int,
              kl_weight: float = 1.0, train_router: bool = False, batch: int = 8, seq_len: int = 128) -> dict:
    """NEXUS: the library's Trainer on the adapter, `steps` optimizer steps; metrics at step 0 and the end."""
    import shutil

    from nexus.train.config import TrainConfig
    from nexus.train.recipe import Trainer

    out = root / "runs" / tag
    shutil.rmtree(out, ignore_errors=True)
    cfg = TrainConfig(student_model=adapter_dir, dataset=data["domain_train"], output_dir=str(out), seq_len=seq_len,
                      batch_size=batch, max_steps=steps, learning_rate=LR, seed=seed, kl_weight=kl_weight,
                      temperature=TEMPERATURE, freeze_router=not train_router, checkpoint_interval=10 ** 9,
                      logging_steps=10 ** 9, device="cpu")
    trainer = Trainer(cfg)
    trainer.setup()
    start = ev(trainer.model)
    times, losses = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        row = trainer.train_step()
        times.append(time.perf_counter() - t0)
        losses.append(row["loss"])
    end = ev(trainer.model)
    n = trainer.params.numel()
    trainer.cleanup()
    return {"start": start, "end": end, "trainable": n, "step_s": statistics.median(times), "loss": losses,
            "rss_mib": rss_mib()}


def _kd_loss(logits, teacher, ids, kl_weight):  # logits, teacher (B, L, V); ids (B, L)
    logits, teacher = logits[:, :-1].float(), teacher[:, :-1].float()
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    if kl_weight:
        t = TEMPERATURE
        kl = F.kl_div(F.log_softmax(logits / t, -1), F.log_softmax(teacher / t, -1), log_target=True,
                      reduction="none").sum(-1).mean()
        loss = loss + kl_weight * t * t * kl
    return loss


def lora_model(rank: int):
    """The demo model with PEFT LoRA on attention q/k/v/o and the fused expert weights (`target_parameters`)."""
    from peft import LoraConfig, get_peft_model

    base = load_base_model(MODEL, dtype=torch.float32)
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                     target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    return get_peft_model(base, cfg)


def lora_rank_for(target: int) -> int:
    """The LoRA rank whose trainable-parameter count is closest to `target` (count is linear in r)."""
    count = lambda r: sum(p.numel() for p in lora_model(r).parameters() if p.requires_grad)  # noqa: E731
    c1, c2 = count(1), count(2)
    return max(1, round((target - (2 * c1 - c2)) / (c2 - c1)))


def esft_model(stats_path: Path, per_layer: int):
    """ESFT-style: only the `per_layer` most-used routed experts of each layer train (by routed top-k
    share in the same router statistics); the other experts' slices get a zero gradient mask."""
    from nexus.moe import find_moe_blocks
    from nexus.stats.accumulate import RouterStats

    stats, _ = RouterStats.load(stats_path)
    model = load_base_model(MODEL, dtype=torch.float32)
    for p in model.parameters():
        p.requires_grad_(False)
    chosen, count = {}, 0
    for b in find_moe_blocks(model):
        freq = stats.sums[b.layer]["topk_count"].float()  # (E,)
        top = torch.argsort(freq, descending=True, stable=True)[:per_layer]
        chosen[b.layer] = top.tolist()
        experts = b.block.experts
        for name in ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias"):
            p = getattr(experts, name)
            mask = torch.zeros(p.shape[0], *([1] * (p.dim() - 1)))  # (E, 1, ...): broadcast over the slice
            mask[top] = 1.0
            p.requires_grad_(True)
            p.register_hook(lambda g, m=mask: g * m)
            count += p[0].numel() * per_layer
    return model, chosen, count


def run_custom(kind: str, data: dict, ev: Evaluator, steps: int, seed: int, stats_path: Path, rank: int = 1,
               per_layer: int = 1, kl_weight: float = 1.0, batch: int = 8, seq_len: int = 128) -> dict:
    """LoRA or ESFT on the Trainer's data stream with the same loss, AdamW, warmup and clipping."""
    from nexus.stream import DataSpec, SequenceStream, StepLayout, build_sequences, trim_padding

    torch.manual_seed(seed)
    tok = load_tokenizer(MODEL)
    extra = {}
    if kind == "lora":
        model = lora_model(rank)
        teacher_ctx = model.disable_adapter
        extra["rank"] = rank
    else:
        model, extra["experts"], n = esft_model(stats_path, per_layer)
        teacher_ctx = lambda: contextlib.nullcontext()  # noqa: E731
    teacher_model = ev.base if kind == "esft" else model
    params = [p for p in model.parameters() if p.requires_grad]
    if kind == "lora":
        n = sum(p.numel() for p in params)
    stream = SequenceStream(build_sequences(DataSpec(data["domain_train"], seq_len=seq_len, seed=seed), tok), seed)
    layout = StepLayout(batch)
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    warmup = max(1, round(0.1 * steps))  # TrainConfig's default: linear warmup over 10 % of the steps
    start = ev(model)
    model.train()
    times, losses = [], []
    for step in range(steps):
        t0 = time.perf_counter()
        ids, mask = trim_padding(*stream.batch(layout.positions(step, 0, 0)))
        with torch.no_grad(), teacher_ctx():
            teacher = teacher_model(input_ids=ids, attention_mask=mask).logits
        loss = _kd_loss(model(input_ids=ids, attention_mask=mask).logits, teacher, ids, kl_weight)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for g in opt.param_groups:
            g["lr"] = LR * min(1.0, (step + 1) / warmup)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
    end = ev(model)
    return {"start": start, "end": end, "trainable": n, "step_s": statistics.median(times), "loss": losses,
            "rss_mib": rss_mib(), **extra}


def isolated(fn_name: str, kwargs: dict) -> dict:
    """Run study_lib.FN(**kwargs) in a fresh interpreter so ru_maxrss is that run's own peak."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(_call, (fn_name, kwargs))


def _call(fn_name: str, kwargs: dict) -> dict:
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    data, root = kwargs.pop("data"), Path(kwargs.pop("root"))
    ev = Evaluator(data, kwargs.pop("eval_num"), kwargs.pop("eval_len"))
    rss0 = rss_mib()
    if fn_name == "nexus":
        res = run_nexus(kwargs.pop("adapter_dir"), data, ev, root, **kwargs)
    else:
        res = run_custom(fn_name, data, ev, stats_path=Path(kwargs.pop("stats_path")), **kwargs)
    res["rss_before_mib"] = rss0
    return res


def zero_init_grads(seq_len: int = 64) -> dict[str, float]:
    """Max |gradient| of each zero-initialized shared-expert tensor (over layers) after one LM backward."""
    from nexus.shared import attach_shared_experts

    torch.manual_seed(0)
    model = load_base_model(MODEL, dtype=torch.float32)
    for p in model.parameters():
        p.requires_grad_(False)
    attach_shared_experts(model, init="zero")
    shared = {n: p for n, p in model.named_parameters() if "nexus_shared_expert" in n}
    for p in shared.values():
        p.requires_grad_(True)
    ids = torch.randint(0, model.config.vocab_size, (2, seq_len))
    model(input_ids=ids, labels=ids).loss.backward()
    out: dict[str, float] = {}
    for n, p in shared.items():
        key = n.rsplit(".", 1)[-1]
        out[key] = max(out.get(key, 0.0), float(p.grad.abs().max()))
    return out
