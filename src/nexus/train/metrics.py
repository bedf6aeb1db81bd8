"""Training metrics: metrics.jsonl, the console line, TensorBoard, and the seeds' health warnings.

Every optimizer step appends one JSON object to `output_dir/metrics.jsonl` (DESIGN "Training
output": step, loss, ce, kl, router_kl, lr, temperature, kl_weight, grad_norm, router_l1,
tokens_per_s, router_entropy / teacher_router_entropy, replay_kl (--replay-dataset), and eval_* when
evaluated; with --general-eval-dataset a row for step 0 holds only the evaluation before training).
Fields that do not apply to a run are null. Only rank 0 writes.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from ..progress import format_eta, rate

log = logging.getLogger("nexus.train")

FIELDS = ("step", "loss", "ce", "kl", "router_kl", "lr", "temperature", "kl_weight", "grad_norm", "router_l1",
          "tokens_per_s", "router_entropy", "teacher_router_entropy", "replay_kl")
WARN_EVERY = 50  # steps between two warnings of the same kind


@dataclass(frozen=True)
class Thresholds:
    """When to warn (the seeds: KL > 0.15 collapse/divergence, grad spikes > 5, router L1 > 0.5)."""

    kl: float = 0.15
    grad_norm: float = 5.0
    router_l1: float = 0.5


def health_warnings(row: dict, t: Thresholds) -> list[tuple[str, str]]:
    """(kind, message) for each threshold a metrics row crosses."""
    out = []
    if row.get("kl") is not None and row["kl"] > t.kl:
        out.append(("kl", f"KL {row['kl']:.4f} is above {t.kl} (possible collapse or divergence; "
                          f"check the learning rate and temperature)"))
    if row.get("grad_norm") is not None and row["grad_norm"] > t.grad_norm:
        out.append(("grad_norm", f"gradient norm {row['grad_norm']:.3f} is above {t.grad_norm} "
                                 f"(instability: lower --learning-rate or --gradient-clip-val)"))
    if row.get("router_l1") is not None and row["router_l1"] > t.router_l1:
        out.append(("router_l1", f"router L1 drift {row['router_l1']:.3f} is above {t.router_l1} "
                                 f"(routing changes a lot)"))
    return out


def console_line(row: dict, max_steps: int, eta_s: float) -> str:
    evals = [f"eval {row['eval_loss']:.4f}"] if "eval_loss" in row else []
    if "eval_general_change" in row:
        evals.append(f"general {row['eval_general_change']:+.2f}%")
    if "loss" not in row:  # the evaluation before the first step (--general-eval-dataset)
        return " | ".join([f"step {row['step']}/{max_steps}", *evals])
    parts = [f"step {row['step']}/{max_steps}", f"loss {row['loss']:.4f}", *evals]
    if row.get("kl") is not None:
        parts.append(f"kl {row['kl']:.4f}")
    parts += [f"lr {row['lr']:.2e}", f"T {row['temperature']:.2f}", f"{rate(row['tokens_per_s'])} tok/s",
              f"ETA {format_eta(eta_s)}"]
    return " | ".join(parts)

def read_metrics(path: str | Path) -> list[dict]:
    rows = []
    p = Path(path)
    if p.is_file():
        for line in p.read_text().splitlines():
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut short by a kill
                    break
    return rows


class MetricsLog:
    """Writes metrics rows; a no-op on ranks other than 0."""

    def __init__(self, output_dir: Path, max_steps: int, logging_steps: int, thresholds: Thresholds,
                 enabled: bool = True, resume_step: int = 0):
        self.path = output_dir / "metrics.jsonl"
        self.max_steps, self.every, self.t = max_steps, max(1, logging_steps), thresholds
        self.enabled = enabled
        self.last_warned: dict[str, int] = {}
        self.warnings: dict[str, int] = {}
        self.start = time.perf_counter()
        self.first_step = resume_step
        self.tb = None
        if not enabled:
            return
        # Rows after the checkpoint we resume from are replaced by the resumed run's.
        rows = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
        with open(self.path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.info("tensorboard is not installed: metrics go to metrics.jsonl only")
        else:
            self.tb = SummaryWriter(str(output_dir / "tensorboard"), purge_step=resume_step + 1)

    def eta(self, step: int) -> float:
        done = step - self.first_step
        if done <= 0:
            return float("inf")
        return (time.perf_counter() - self.start) / done * (self.max_steps - step)

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"train/{k}" if not k.startswith("eval_") else f"eval/{k[5:]}", v, row["step"])
        step = row["step"]
        for kind, message in health_warnings(row, self.t):
            self.warnings[kind] = self.warnings.get(kind, 0) + 1
            if step - self.last_warned.get(kind, -WARN_EVERY) >= WARN_EVERY:
                self.last_warned[kind] = step
                log.warning(f"warning: step {step}: {message}")
        if step % self.every == 0 or step == self.max_steps or step == self.first_step + 1 or "eval_loss" in row:
            log.info(console_line(row, self.max_steps, self.eta(step)))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.enabled and self.warnings:
            log.warning("warnings during training: " + ", ".join(f"{k} ×{n}" for k, n in sorted(self.warnings.items())))
