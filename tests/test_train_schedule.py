"""Schedules are pure functions of the step: warmup / stable / cosine lr, temperature annealing, KL warmup."""

import math

import pytest

from nexus.errors import NexusError
from nexus.train.schedule import Schedule, anneal, lr_factor


def test_plain_schedule_is_linear_warmup_then_constant():
    s = Schedule(max_steps=100, peak_lr=1e-3, warmup_ratio=0.1)
    assert s.warmup_steps == 10
    assert s.lr(0) == pytest.approx(1e-4)  # the first step already learns
    assert s.lr(4) == pytest.approx(5e-4)
    assert [s.lr(i) for i in (9, 10, 50, 99)] == pytest.approx([1e-3] * 4)
    assert {s.temp(i) for i in range(100)} == {2.0}  # constant temperature without the advanced scheduler


def test_advanced_schedule_phases():
    s = Schedule(max_steps=100, peak_lr=1.0, advanced=True, warmup_ratio=0.1, stable_ratio=0.3, final_lr_ratio=0.1)
    lrs = [s.lr(i) for i in range(100)]
    assert lrs[9] == pytest.approx(1.0) and all(v == pytest.approx(1.0) for v in lrs[10:40])
    assert lrs[99] == pytest.approx(0.1)  # decays exactly to final_lr_ratio × peak at the last step
    decay = lrs[40:]
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    mid = 40 + (99 - 40) / 2  # cosine: halfway down at the middle of the decay
    assert lr_factor(int(mid), 100, 10, 30, 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 29 / 59)))


def test_temperature_anneals_linearly_from_start_ratio():
    s = Schedule(max_steps=101, peak_lr=1.0, advanced=True, temperature=3.0, final_temperature=1.0,
                 temperature_anneal_start=0.5)
    start = round(0.5 * 101)
    assert s.temp(0) == s.temp(start) == 3.0
    assert s.temp(100) == pytest.approx(1.0)
    assert s.temp((start + 100) // 2) == pytest.approx(2.0, abs=0.05)
    assert anneal(5, 10, 2.0, 1.0, 1.0) == 2.0  # annealing that starts at the end never happens


def test_kl_weight_warmup():
    s = Schedule(max_steps=20, peak_lr=1.0, warmup_ratio=0.25, kl_weight=2.0, kl_weight_warmup=True)
    assert [s.kl_w(i) for i in range(6)] == pytest.approx([0.4, 0.8, 1.2, 1.6, 2.0, 2.0])
    assert Schedule(max_steps=20, peak_lr=1.0, kl_weight=2.0).kl_w(0) == 2.0


def test_at_bundles_all_three():
    s = Schedule(max_steps=10, peak_lr=1.0)
    assert s.at(3) == {"lr": s.lr(3), "temperature": s.temp(3), "kl_weight": s.kl_w(3)}


@pytest.mark.parametrize("kw, flag", [
    (dict(warmup_ratio=1.0), "--warmup-ratio"),
    (dict(max_steps=0), "--max-steps"),
    (dict(peak_lr=0.0), "--learning-rate"),
    (dict(advanced=True, warmup_ratio=0.6, stable_ratio=0.6), "--stable-ratio"),
    (dict(temperature=0.0), "--temperature"),
    (dict(temperature_anneal_start=1.5), "--temperature-anneal-start"),
])
def test_bad_values_name_the_flag(kw, flag):
    args = dict(max_steps=10, peak_lr=1e-3)
    args.update(kw)
    with pytest.raises(NexusError, match=flag):
        Schedule(**args)
