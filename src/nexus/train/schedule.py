"""Learning-rate, temperature and KL-weight schedules: pure functions of the optimizer step.

Steps are 0-based: `step` is the optimizer step about to be taken, so step 0 already has a nonzero
learning rate and the last step is `max_steps - 1`. Nothing here holds state, which is what makes
resuming exact: the schedule's "state" is the step number stored in the checkpoint.

Advanced (DeepSeek-V3 style, `--use-advanced-scheduler`):

    lr:          linear warmup (warmup_ratio) -> constant (stable_ratio) -> cosine to final_lr_ratio × peak
    temperature: constant until temperature_anneal_start × max_steps, then linear to final_temperature
    kl weight:   0 -> kl_weight over the warmup when kl_weight_warmup, else constant

Plain (default): linear warmup, then constant lr; constant temperature; the same kl-weight rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import NexusError


@dataclass(frozen=True)
class Schedule:
    max_steps: int
    peak_lr: float
    advanced: bool = False
    warmup_ratio: float = 0.1
    stable_ratio: float = 0.5
    final_lr_ratio: float = 0.1
    temperature: float = 2.0
    final_temperature: float = 1.0
    temperature_anneal_start: float = 0.5
    kl_weight: float = 1.0
    kl_weight_warmup: bool = False

    def __post_init__(self):
        check_schedule(self)

    @property
    def warmup_steps(self) -> int:
        return int(math.ceil(self.warmup_ratio * self.max_steps))

    @property
    def stable_steps(self) -> int:
        return int(round(self.stable_ratio * self.max_steps)) if self.advanced else self.max_steps

    def lr(self, step: int) -> float:
        return self.peak_lr * lr_factor(step, self.max_steps, self.warmup_steps, self.stable_steps,
                                        self.final_lr_ratio if self.advanced else 1.0)

    def temp(self, step: int) -> float:
        if not self.advanced:
            return self.temperature
        return anneal(step, self.max_steps, self.temperature, self.final_temperature, self.temperature_anneal_start)

    def kl_w(self, step: int) -> float:
        if not self.kl_weight_warmup or self.warmup_steps == 0:
            return self.kl_weight
        return self.kl_weight * min(1.0, (step + 1) / self.warmup_steps)

    def at(self, step: int) -> dict[str, float]:
        """{lr, temperature, kl_weight} for `step`."""
        return {"lr": self.lr(step), "temperature": self.temp(step), "kl_weight": self.kl_w(step)}


def lr_factor(step: int, max_steps: int, warmup_steps: int, stable_steps: int, final_ratio: float) -> float:
    """Multiplier of the peak lr: warmup (linear, reaching 1 on its last step), stable, cosine decay.

    The decay runs from step `warmup_steps + stable_steps` to `max_steps - 1`, ending exactly at
    `final_ratio`. With `stable_steps >= max_steps` there is no decay (the plain schedule).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_start = warmup_steps + stable_steps
    if step < decay_start:
        return 1.0
    span = max_steps - 1 - decay_start
    if span <= 0:  # a one-step decay phase: the last step
        return final_ratio
    progress = min(1.0, (step - decay_start) / span)
    return final_ratio + (1.0 - final_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def anneal(step: int, max_steps: int, start_value: float, end_value: float, start_ratio: float) -> float:
    """`start_value` until `start_ratio` × max_steps, then linear to `end_value` at the last step."""
    start = int(round(start_ratio * max_steps))
    if step <= start:
        return start_value
    span = max_steps - 1 - start
    if span <= 0:
        return end_value
    progress = min(1.0, (step - start) / span)
    return start_value + (end_value - start_value) * progress


def check_schedule(s: Schedule) -> None:
    """Flag-level validation; messages name the flag to fix."""
    if s.max_steps < 1:
        raise NexusError(f"--max-steps must be at least 1, got {s.max_steps}")
    if not s.peak_lr > 0:
        raise NexusError(f"--learning-rate must be positive, got {s.peak_lr}")
    if not 0 <= s.warmup_ratio < 1:
        raise NexusError(f"--warmup-ratio must be in [0, 1), got {s.warmup_ratio}")
    if not 0 <= s.stable_ratio <= 1:
        raise NexusError(f"--stable-ratio must be in [0, 1], got {s.stable_ratio}")
    if s.advanced and s.warmup_ratio + s.stable_ratio > 1:
        raise NexusError(f"--warmup-ratio + --stable-ratio must be at most 1, got {s.warmup_ratio + s.stable_ratio}")
    if not 0 <= s.final_lr_ratio <= 1:
        raise NexusError(f"--final-lr-ratio must be in [0, 1], got {s.final_lr_ratio}")
    if not s.temperature > 0 or not s.final_temperature > 0:
        raise NexusError(f"--temperature and --final-temperature must be positive, got {s.temperature}, "
                         f"{s.final_temperature}")
    if not 0 <= s.temperature_anneal_start <= 1:
        raise NexusError(f"--temperature-anneal-start must be in [0, 1], got {s.temperature_anneal_start}")
    if s.kl_weight < 0:
        raise NexusError(f"--kl-weight must be non-negative, got {s.kl_weight}")
