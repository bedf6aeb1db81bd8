"""Schedules are pure functions of the step: warmup / stable / cosine lr, temperature annealing, KL warmup."""

import pytest

from nexus.errors import NexusError
from nexus.train.schedule import Schedule, anneal


def test_plain_schedule_is_linear_warmup_then_constant():
    s = Schedule(max_steps=100, peak_lr=1e-3, warmup_ratio=0.1)
    assert s.warmup_steps == 10
    assert s.lr(0) == pytest.approx(1e-4)  # the first step already learns
    assert s.lr(4) == pytest.approx(5e-4)
    assert [s.lr(i) for i in (9, 10, 50, 99)] == pytest.approx([1e-3] * 4)
    assert {s.temp(i) for i in range(100)} == {2.0}  # constant temperature without the advanced scheduler


def test_advanced_schedule_phases():
    s = Schedule(max_steps=100, peak_lr=1.0, advanced=True, warmup_ratio=0.1, stable_ratio=0.29, final_lr_ratio=0.1)
    lrs = [s.lr(i) for i in range(100)]  # warmup 0..9, stable 10..38, cosine decay over steps 39..99
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(v == pytest.approx(1.0) for v in lrs[9:40]) and lrs[40] < 1.0
    assert lrs[69] == pytest.approx(0.55)  # halfway through the decay: halfway down, 0.1 + 0.9 / 2
    assert lrs[99] == pytest.approx(0.1)  # decays exactly to final_lr_ratio × peak at the last step
    decay = lrs[39:]
    assert all(a > b for a, b in zip(decay, decay[1:]))


@pytest.mark.parametrize("max_steps, warmup, stable, final", [(100, 0.1, 0.3, 0.1), (57, 0.2, 0.5, 0.0),
                                                               (10, 0.0, 0.0, 0.5)])
def test_advanced_schedule_is_transformers_wsd_with_the_warmup_counting_the_step_taken(max_steps, warmup, stable,
                                                                                      final):
    """transformers is the reference: stable and cosine decay are get_wsd_schedule's; warmup is its linear
    warmup from 0 (get_constant_schedule_with_warmup: WSD's own warmup starts at min_lr_ratio). Our step s
    is the step about to be taken, so warmup step s has transformers' factor of s + 1 (step 0 learns)."""
    import torch
    from transformers import get_constant_schedule_with_warmup, get_wsd_schedule

    s = Schedule(max_steps=max_steps, peak_lr=1.0, advanced=True, warmup_ratio=warmup, stable_ratio=stable,
                 final_lr_ratio=final)
    decay = max_steps - 1 - s.warmup_steps - s.stable_steps  # ours reaches final_lr_ratio on the last step
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    hf = get_wsd_schedule(optimizer, s.warmup_steps, decay, num_stable_steps=s.stable_steps,
                          min_lr_ratio=final).lr_lambdas[0]
    warm = get_constant_schedule_with_warmup(optimizer, s.warmup_steps).lr_lambdas[0]
    for step in range(max_steps):
        expected = warm(step + 1) if step < s.warmup_steps else hf(step)
        assert s.lr(step) == pytest.approx(expected, abs=1e-12), step


def test_plain_schedule_is_transformers_constant_with_warmup_likewise():
    import torch
    from transformers import get_constant_schedule_with_warmup

    s = Schedule(max_steps=50, peak_lr=1.0, warmup_ratio=0.2)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    hf = get_constant_schedule_with_warmup(optimizer, s.warmup_steps).lr_lambdas[0]
    assert [s.lr(i) for i in range(50)] == pytest.approx([hf(i + 1) if i < 10 else hf(i) for i in range(50)])


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
