"""benchmarks/study*.py without training: the plateau stopping rule, the best-validation restore, the
Pareto / best-under-5 % selection, the FLOPs formula on the demo model, and resumability."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import study  # noqa: E402
import study_lib as L  # noqa: E402
import study_report as R  # noqa: E402


def test_plateau_rule():
    rule = L.Plateau(patience=3, min_delta=1e-3)
    seq = [5.0, 4.0, 3.9995, 3.99, 3.995, 3.991, 3.992, 3.0]
    stops = [rule.update(v) for v in seq[:7]]
    assert stops == [False] * 6 + [True]  # 3 evaluations after 3.99 without a > 1e-3 improvement
    assert rule.best == 3.99
    rule = L.Plateau(patience=2, min_delta=0.0)
    assert [rule.update(v) for v in (3.0, 2.0, 1.0, 0.5)] == [False] * 4


def test_trend_drop_is_the_least_squares_line_fall():
    import numpy as np

    ys = np.random.default_rng(0).normal(4.0, 0.05, 20)
    for window in (3, 7, 12):
        slope = np.polyfit(np.arange(window), ys[-window:], 1)[0]
        assert L.trend_drop(list(ys), window) == pytest.approx(-slope * (window - 1), rel=1e-9, abs=1e-12)
    assert L.trend_drop(list(ys[:5]), 12) is None  # fewer losses than the window


def test_trend_rule_ignores_noise_that_trips_the_patience_rule():
    # falling 0.004 per evaluation, every fourth evaluation 0.02 low: the patience rule stops three evaluations
    # after the first low one, the trend rule keeps going; once the fall stops, it stops within one window
    noise = [-0.02 if i % 4 == 0 else 0.0 for i in range(60)]
    falling = [4.0 - 0.004 * i + noise[i] for i in range(40)]
    flat = [falling[-1] + noise[40 + i] for i in range(20)]
    patience = L.Plateau(patience=3, min_delta=1e-3)
    assert any(patience.update(v) for v in falling)
    trend = L.Plateau(patience=3, min_delta=0.01, window=12)
    assert not any(trend.update(v) for v in falling)
    stops = [trend.update(v) for v in flat]
    assert True in stops and stops.index(True) < 12
    assert trend.best == min(falling + flat[:stops.index(True) + 1])  # any new lowest loss is kept
    with pytest.raises(ValueError, match="at least 3"):
        L.Plateau(patience=3, min_delta=0.01, window=2)
    with pytest.raises(SystemExit):
        study.main(["--trend-window", "2", "--report"])


class _FakeEval:
    def __init__(self, losses):
        self.losses = iter(losses)

    def val_loss(self, model):
        return next(self.losses)


def test_loop_restores_best_validation_params():
    p = torch.nn.Parameter(torch.zeros(2))

    def step_fn(step):
        with torch.no_grad():
            p.add_(1.0)
        return 0.0

    # val at steps 0, 2, 4, 6, 8: best at step 4, then 2 evaluations without improvement -> stop at 8
    rec = L._loop(step_fn, [p], torch.nn.Linear(1, 1), _FakeEval([3.0, 2.0, 1.0, 1.5, 1.2]), max_steps=100,
                  eval_every=2, patience=2, min_delta=0.0)
    assert (rec["steps"], rec["best_step"], rec["stopped"]) == (8, 4, "plateau")
    assert torch.equal(p.detach(), torch.full((2,), 4.0))
    rec = L._loop(step_fn, [p], torch.nn.Linear(1, 1), _FakeEval([3.0, 2.0, 1.5, 1.0]), max_steps=5,
                  eval_every=2, patience=2, min_delta=0.0)
    assert (rec["steps"], rec["best_step"], rec["stopped"]) == (5, 5, "max_steps")  # evaluated at the last step
    # trend rule (window 3): the line through 2.0, 1.9, 1.95 falls 0.05 < 0.1 -> stop at step 6, best at step 4
    rec = L._loop(step_fn, [p], torch.nn.Linear(1, 1), _FakeEval([3.0, 2.0, 1.9, 1.95]), max_steps=100,
                  eval_every=2, patience=1, min_delta=0.1, trend_window=3)
    assert (rec["steps"], rec["best_step"], rec["stopped"]) == (6, 4, "plateau")


class _ParamEval(_FakeEval):
    """Validation losses from a list; full-split scores read off the parameter's value (to see which checkpoint
    was scored)."""

    def __init__(self, losses, p):
        super().__init__(losses)
        self.p = p

    def __call__(self, model, baseline=True):
        v = self.p.detach()
        return {"domain_loss": float(v[0]), "general_loss": float(v[1])}


def test_loop_selects_the_best_domain_checkpoint_under_the_general_limit():
    p = torch.nn.Parameter(torch.zeros(2))

    def step_fn(step):
        with torch.no_grad():
            p.add_(1.0)
        return 0.0

    # evaluations at steps 0, 1, ..., 5: domain val falls all along, general val change (%) rises past 5 at
    # step 4; the last evaluation under the limit is step 3, the plateau-best one step 5 (max_steps)
    general = iter([0.5, 1.0, 4.9, 3.0, 5.0, 7.0])
    ev = _ParamEval([3.0, 2.5, 2.0, 2.1, 1.8, 1.7], p)
    rec = L._loop(step_fn, [p], torch.nn.Linear(1, 1), ev, max_steps=5, eval_every=1, patience=9, min_delta=0.0,
                  general=lambda model: next(general), max_general=5.0)
    assert rec["best_step"] == 5 and rec["general_val_curve"] == [(0, 0.5), (1, 1.0), (2, 4.9), (3, 3.0),
                                                                   (4, 5.0), (5, 7.0)]
    # step 2 (val 2.0, general 4.9) beats step 3 (val 2.1); step 4 is at the limit, not under it
    assert {k: rec["selected"][k] for k in ("step", "val_loss", "general_val_change")} == \
        {"step": 2, "val_loss": 2.0, "general_val_change": 4.9}
    assert torch.equal(rec["selected_params"][0], torch.full((2,), 2.0))
    assert torch.equal(p.detach(), torch.full((2,), 5.0))  # the plateau-best values, as without --general-val
    end = L._score(rec, [p], torch.nn.Linear(1, 1), ev)
    assert end == {"domain_loss": 5.0, "general_loss": 5.0}  # scored before the selected values went in
    assert rec["selected"]["end"] == {"domain_loss": 2.0, "general_loss": 2.0} and "selected_params" not in rec
    # nothing under the limit, step 0 included: no selection, one scoring
    p2 = torch.nn.Parameter(torch.zeros(2))
    rec = L._loop(lambda s: 0.0, [p2], torch.nn.Linear(1, 1), _ParamEval([3.0, 2.0], p2), max_steps=1, eval_every=1,
                  patience=9, min_delta=0.0, general=lambda model: 6.0, max_general=5.0)
    assert rec["selected"] is None and rec["selected_params"] is None
    L._score(rec, [p2], torch.nn.Linear(1, 1), _ParamEval([], p2))
    assert rec["selected"] is None
    # without a general measure the record is as before
    rec = L._loop(lambda s: 0.0, [p2], torch.nn.Linear(1, 1), _FakeEval([3.0, 2.0]), max_steps=1, eval_every=1,
                  patience=9, min_delta=0.0)
    assert "selected" not in rec and "general_val_curve" not in rec


def test_general_val_flags_are_checked(tmp_path, capsys):
    with pytest.raises(SystemExit):
        study.main(["--general-val", str(tmp_path / "missing.jsonl"), "--report"])
    assert "--general-val: expected a JSONL file" in capsys.readouterr().err
    (tmp_path / "g.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(SystemExit):
        study.main(["--general-val", str(tmp_path / "g.jsonl"), "--max-general", "0", "--report"])
    assert "--max-general: expected a positive percentage" in capsys.readouterr().err


def test_replay_flags_are_checked(tmp_path, capsys):
    with pytest.raises(SystemExit):
        study.main(["--replay", str(tmp_path / "missing.jsonl"), "--report"])
    assert "--replay: expected a JSONL file" in capsys.readouterr().err
    (tmp_path / "g.jsonl").write_text('{"text": "x"}\n')
    for bad in ("0", "-1", "nan"):
        with pytest.raises(SystemExit):
            study.main(["--replay", str(tmp_path / "g.jsonl"), "--replay-weight", bad, "--report"])
        assert "--replay-weight: expected a positive number" in capsys.readouterr().err


def test_replay_is_the_trainers_replay_for_every_method(tmp_path):
    """The custom methods' replay reads the sequences `nexus train --replay-dataset` reads at each step, and
    its term is the Trainer's `replay_kl` on the same logits."""
    from tiny import save_model_dir, write_text_dataset, write_word_dataset
    from transformers import AutoModelForCausalLM

    from nexus.train.config import TrainConfig
    from nexus.train.recipe import Trainer

    model_dir = save_model_dir(tmp_path / "model")
    general = write_word_dataset(tmp_path / "general.jsonl", n=20, seed=4)
    cfg = TrainConfig(student_model=str(model_dir), dataset=str(write_text_dataset(tmp_path / "d.jsonl", n=24)),
                      output_dir=str(tmp_path / "out"), seq_len=32, batch_size=2, max_steps=5, seed=3,
                      init_strategy="random", device="cpu", replay_dataset=str(general), kl_weight=0.0)
    t = Trainer(cfg)
    try:
        t.setup()
        replay = L.replay_batches(str(general), t.tokenizer, 32, 3, 2)
        for step in (0, 1, 4):
            ids, mask = replay(step)
            (b,) = t._replay_batches(step)
            assert torch.equal(ids, b["ids"]) and torch.equal(mask, b["mask"])
        with torch.no_grad():  # a student away from the base, so that the KL is not ~0
            for p in t.params.params:
                p.mul_(30)
        ids, mask = replay(0)
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        with torch.no_grad():
            expected = L.replay_kl(t.model.eval()(input_ids=ids, attention_mask=mask).logits,
                                   base(input_ids=ids, attention_mask=mask).logits, mask)
        t.model.train()
        row = t._optimizer_step(0)
        assert expected > 1e-3 and row["replay_kl"] == pytest.approx(float(expected), rel=1e-5)
    finally:
        t.cleanup()


def _row(method, lr, seed, dom, gen, base_dom=4.0, base_gen=3.0):
    """A results line whose domain gain is `dom` % and general change `gen` %."""
    return {"method": method, "lr": lr, "seed": seed, "model": "m", "command": "python benchmarks/study.py",
            "trainable": 10, "flops_per_token": 100, "steps": 10, "best_step": 5, "step_s": 0.1, "rss_mib": 1.0,
            "stopped": "plateau", "torch": "x", "threads": 1,
            "start": {"base_domain_loss": base_dom, "base_general_loss": base_gen},
            "end": {"domain_loss": base_dom * (1 - dom / 100), "general_loss": base_gen * (1 + gen / 100)}}


def test_pareto_best_under_five_percent(tmp_path):
    rows = []
    for seed, jitter in ((0, -0.1), (1, 0.0), (2, 0.1)):
        rows += [_row("a", 1e-3, seed, 2 + jitter, 1), _row("a", 1e-2, seed, 9 + jitter, 7),  # 1e-2 breaks 5 %
                 _row("a", 3e-3, seed, 4 + jitter, 4.9),
                 _row("b", 1e-3, seed, 3.9 + 3 * jitter, 0.5), _row("c", 1e-3, seed, 1, 6)]
    pts = R.points(rows)
    assert pts["a"][1e-3]["domain"]["mean"] == pytest.approx(2.0)
    assert pts["a"][3e-3]["general"]["mean"] == pytest.approx(4.9)
    best = R.best_under(pts)
    assert best["a"][0] == 3e-3 and best["b"][0] == 1e-3 and "c" not in best
    sep = R.separation(best["a"][1], best["b"][1])
    assert sep["paired_diff"] == pytest.approx(0.1) and not sep["exceeds_spread"]  # b's seeds span 3.6–4.2
    assert R.separation(best["a"][1], pts["a"][1e-3])["exceeds_spread"]
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = R.write_report(path, tmp_path / "out", tmp_path / "study.md", "python benchmarks/study_report.py")
    assert (tmp_path / "out" / "pareto.png").stat().st_size > 0 and (tmp_path / "study.md").is_file()
    assert "| a | 0.003 | +4.00 ± 0.10 | +4.90 ± 0.00 | 3 |" in text
    assert "No learning rate kept the general loss increase under 5 % for: c." in text


def test_every_point_table_says_how_fast_validation_loss_still_fell(tmp_path):
    falling = dict(_row("a", 1e-3, 0, 2.0, 1.0), val_curve=[[25 * i, 4.0 - 0.01 * i] for i in range(20)])
    flat = dict(_row("b", 1e-3, 0, 1.0, 1.0), val_curve=[[25 * i, 4.0 - 0.01 * min(i, 5)] for i in range(20)])
    rows = (falling, flat, _row("c", 1e-3, 0, 1, 1))
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    R.write_report(tmp_path / "results.jsonl", tmp_path)
    table = {ln.split(" | ")[0].strip("| "): ln.rstrip(" |").rsplit("| ", 1)[1]
             for ln in (tmp_path / "report.md").read_text().split("## Every point")[1].splitlines()
             if ln.startswith("| ") and " 0.001 " in ln}
    assert table == {"a": "0.110", "b": "0.000", "c": "–"}  # 11 intervals of 0.01; flat; no curve recorded
    short = dict(_row("d", 1e-3, 0, 1, 1), val_curve=[[0, 4.0], [25, 3.9], [50, 3.8], [75, 3.7]])
    (tmp_path / "results.jsonl").write_text(json.dumps(short) + "\n")
    R.write_report(tmp_path / "results.jsonl", tmp_path)
    assert "| 0.300 |" in (tmp_path / "report.md").read_text()  # fewer than 12 evaluations: the line through all


def test_budget_check_sets_longer_runs_beside_the_same_runs(tmp_path):
    short = [_row("a", 1e-3, 0, 2.0, 1.0), _row("b", 1e-3, 0, 3.0, 1.0)]
    for r in short:
        r["protocol"] = {"max_steps": 300}
    longer = [dict(_row("a", 1e-3, 0, 2.5, 1.5), protocol={"max_steps": 1000}, steps=700, best_step=625,
                   stopped="plateau"),
              dict(_row("z", 1e-3, 0, 9.0, 0.0), protocol={"max_steps": 1000})]  # no partner: left out
    section = R.budget_check(short, longer)
    assert "## A longer budget: --max-steps 1000 against 300" in section
    assert "| a | 0.001 | 0 | +2.00 / +1.00 | 10 (5), plateau | +2.50 / +1.50 | 700 (625), plateau |" in section
    assert "| z |" not in section and "| b |" not in section
    main, extra = tmp_path / "results.jsonl", tmp_path / "long.jsonl"
    main.write_text("".join(json.dumps(r) + "\n" for r in short))
    extra.write_text("".join(json.dumps(r) + "\n" for r in longer))
    text = R.write_report(main, tmp_path / "out", longer=extra)
    assert text.index("## A longer budget") < text.index("## Every point")
    assert R.budget_check(short, longer[1:]) == ""


def test_beside_sets_the_same_runs_under_another_setting_side_by_side(tmp_path):
    main = [dict(_row("p", 3e-3, seed, 5.0 + seed, 4.0), protocol={"hidden_tokens": 2048, "max_steps": 300})
            for seed in (0, 1)]
    other = [dict(_row("p", 3e-3, 0, 4.0, 4.5), protocol={"hidden_tokens": 0, "max_steps": 300}),
             dict(_row("p", 3e-3, 1, 5.5, 3.5), protocol={"hidden_tokens": 0, "max_steps": 300}),
             dict(_row("q", 3e-3, 0, 1.0, 1.0), protocol={"hidden_tokens": 0, "max_steps": 300})]  # no partner
    section = R.beside_check(main, other)
    assert "## Beside: hidden_tokens 0 against hidden_tokens 2048" in section
    assert "| p | 0.003 | 0 | +5.00 / +4.00 | +4.00 / +4.50 | -1.00 / +0.50 |" in section
    assert "| p | 0.003 | 1 | +6.00 / +4.00 | +5.50 / +3.50 | -0.50 / -0.50 |" in section
    assert "- p at lr 0.003: -0.75 / +0.00 over 2 seeds (domain: every seed the same sign)" in section
    assert "| q |" not in section and R.beside_check(main, other[2:]) == ""
    same = [dict(r, protocol={"hidden_tokens": 0, "max_steps": 300}) for r in main]  # a rerun that reproduced
    assert "- p at lr 0.003: +0.00 / +0.00 over 2 seeds (domain: identical on every seed)" in R.beside_check(main, same)
    plain = [dict(r, protocol={"max_steps": 300}) for r in other]  # a setting one side never used is named so
    assert "## Beside: hidden_tokens 0 against without hidden_tokens" in R.beside_check(plain, other)
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps(r) + "\n" for r in main))
    b.write_text("".join(json.dumps(r) + "\n" for r in other))
    text = R.write_report(a, tmp_path / "out", beside=b)
    assert text.index("## Beside") < text.index("## Every point")


def test_answers_name_the_best_nexus_setting_and_compare_it_seed_by_seed():
    rows = []
    for seed, j in ((0, -0.2), (1, 0.0), (2, 0.2)):
        rows += [_row("nexus-pca_top8", 1e-3, seed, 5 + j, 2), _row("nexus-pca_top8", 1e-2, seed, 9, 6),
                 _row("nexus-random", 1e-3, seed, 4.9 - j, 2),   # overlaps pca's seeds: within noise
                 _row("nexus-frequency_top8", 1e-3, seed, 2 + j, 1),  # clearly behind
                 _row("esft", 3e-3, seed, 7 + j, 3),  # clearly ahead of every NEXUS setting
                 _row("lora-attn", 1e-3, seed, 3, 8)]  # never under 5 %
    pts = R.points(rows)
    text = "\n".join(R.answers(pts, R.best_under(pts)))
    assert "Best NEXUS setting: **nexus-pca_top8** (lr 0.001: domain +5.00 ± 0.20 %" in text
    assert "nexus-pca_top8 against **esft** (lr 0.003: domain +7.00 ± 0.20 %, general +3.00 ± 0.00 %): -2.00 pt " \
           "paired over 3 seeds (-2.00, -2.00, -2.00): behind, beyond seed noise." in text
    assert "lora-attn: no learning rate kept the general loss increase under 5 %." in text
    assert "against nexus-random: +0.10 pt paired over 3 seeds (-0.30, +0.10, +0.50): within seed noise" in text
    assert "against nexus-frequency_top8: +3.00 pt paired over 3 seeds (+3.00, +3.00, +3.00): ahead, beyond " \
           "seed noise." in text


def test_head_to_head_pairs_seeds_on_both_axes_at_each_learning_rate(tmp_path):
    rows = []
    for seed, j in ((0, -0.2), (1, 0.0), (2, 0.2)):
        rows += [_row("nexus-random", 3e-3, seed, 8.5 + j, 8 + j),
                 _row("nexus-pruned_top8", 3e-3, seed, 8.6 + j, 7.5 + j),  # best NEXUS at 3e-3
                 _row("esft", 3e-3, seed, 11 + j, 4.5 + j),  # better on both axes
                 _row("lora-attn", 3e-3, seed, 8.7 - j, 7.3 - j),  # within noise on both
                 _row("nexus-random", 1e-2, seed, 9, 9)]  # no other method at 1e-2: no row
    h2h = R.head_to_head(R.points(rows))
    assert [(h["lr"], h["nexus"], h["other"]) for h in h2h] == [(3e-3, "nexus-pruned_top8", "esft"),
                                                               (3e-3, "nexus-pruned_top8", "lora-attn")]
    esft, lora = h2h
    assert esft["domain"] == "-2.40 pt paired over 3 seeds (-2.40, -2.40, -2.40): behind, beyond seed noise"
    assert esft["general"] == "+3.00 pt paired over 3 seeds (+3.00, +3.00, +3.00): costs more, beyond seed noise"
    assert esft["overall"] == "esft better on both, beyond seed noise"
    assert lora["general"].startswith("+0.20 pt paired over 3 seeds (-0.20, +0.20, +0.60): within seed noise")
    assert lora["overall"] == "within seed noise on at least one axis"
    flipped = R.separation(R.points(rows)["esft"][3e-3], R.points(rows)["nexus-pruned_top8"][3e-3], "general")
    assert flipped["paired_diff"] == pytest.approx(-3.0) and flipped["exceeds_spread"]
    # no NEXUS setting under 5 %: the answers fall back to these pairings, and the report has the table
    text = "\n".join(R.answers(R.points(rows), R.best_under(R.points(rows))))
    assert "At lr 0.003, whatever the general cost, nexus-pruned_top8 against esft: domain gain -2.40 pt" in text
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = R.write_report(path, tmp_path / "out")
    assert "| 0.003 | nexus-pruned_top8 | esft | -2.40 pt paired" in report
    assert report.index("## Head to head") < report.index("## Every point")


def _selected(row, step, gval, dom, gen):
    """`row` as a --general-val run whose selected checkpoint (at `step`, general_val change `gval` %) has a domain
    gain of `dom` % and a general change of `gen` %."""
    s = row["start"]
    return {**row, "max_general": 5.0, "general_val_curve": [], "selected": {
        "step": step, "val_loss": 1.0, "general_val_change": gval,
        "end": {"domain_loss": s["base_domain_loss"] * (1 - dom / 100),
                "general_loss": s["base_general_loss"] * (1 + gen / 100)}}}


def test_selected_checkpoints_get_their_own_section(tmp_path):
    rows = []
    for seed, j in ((0, -0.1), (1, 0.1)):
        rows += [_selected(_row("nexus-pruned_top8", 3e-3, seed, 8.7 + j, 8 + j), 300 + 100 * seed, 4.5, 6 + j, 4 + j),
                 _selected(_row("esft", 3e-3, seed, 11 + j, 4.4 + j), 1700, 4.0, 11 + j, 4.4 + j)]
    rows.append({**_row("lora-attn", 3e-3, 0, 9, 8), "max_general": 5.0, "selected": None})  # none qualified
    rows.append(_row("lora-attn", 1e-2, 0, 9, 8))  # a run without --general-val: not in the section
    pts = R.points(rows, selected=True)
    assert set(pts) == {"nexus-pruned_top8", "esft"}
    assert pts["nexus-pruned_top8"][3e-3]["per_seed"][1] == pytest.approx((6.1, 4.1))
    assert R.points(rows)["nexus-pruned_top8"][3e-3]["per_seed"][1] == pytest.approx((8.8, 8.1))  # plateau point
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = R.write_report(path, tmp_path / "out")
    section = report[report.index("## Checkpoints selected"):report.index("## Every point")]
    assert "| nexus-pruned_top8 | 0.003 | 2 | 350 / 10 | +4.50 | +6.00 ± 0.14 | +4.00 ± 0.14 | 2 of 2 |" in section
    assert "| esft | 0.003 | 2 | 1700 / 10 | +4.00 | +11.00 ± 0.14 | +4.40 ± 0.14 | 2 of 2 |" in section
    assert "| lora-attn | 0.003 | 1 | none qualified |" in section and "| lora-attn | 0.01 |" not in section
    assert "| 0.003 | nexus-pruned_top8 | esft | -5.00 pt paired over 2 seeds (-5.00, -5.00): behind, beyond seed " \
           "noise |" in section
    answers = report[report.index("## Answers"):report.index("## Best domain gain")]
    assert "- On the checkpoints selected under 5 % on general validation text (see \"Checkpoints selected\" below), at lr " \
           "0.003, nexus-pruned_top8 against esft: domain gain -5.00 pt paired over 2 seeds" in answers
    # without any --general-val run there is no section
    path.write_text("".join(json.dumps(r) + "\n" for r in rows if "selected" not in r))
    assert "## Checkpoints selected" not in R.write_report(path, tmp_path / "out2")


def test_equal_cost_names_a_single_learning_rate_a_chord():
    rows = [_row(m, lr, seed, d, g) for seed in (0, 1) for m, lr, d, g in
            (("nexus-random", 1e-3, 3, 1), ("nexus-random", 1e-2, 6, 4), ("esft", 3e-3, 4, 2))]
    pts = R.points(rows)
    text = "\n".join(R.answers(pts, R.best_under(pts)))
    assert "% domain gain (esft: one learning rate, so a chord from the base model to it, not a front)." in text


def test_equal_cost_interpolates_each_seeds_pareto_front():
    # front: base (0, 0), (1, 3), (4, 6); (3, 2) is dominated, (9, 5) is past the front's best
    assert R.front_at([(1, 3), (3, 2), (4, 6), (9, 5)], 2.0) == pytest.approx(4.0)
    assert R.front_at([(1, 3), (4, 6)], 0.5) == pytest.approx(1.5)  # between the base and the first point
    assert R.front_at([(1, 3), (4, 6)], 7.0) == pytest.approx(6.0)  # past the front: its best gain
    assert R.front_at([(-0.5, 1.0), (2, 2)], 0.0) == pytest.approx(1.2)  # a point cheaper than the base
    rows = [_row("a", lr, seed, d + seed, g) for seed in (0, 1) for lr, d, g in ((1e-3, 3, 1), (1e-2, 6, 4))]
    eq = R.equal_cost(R.points(rows), 2.0)
    assert eq["a"]["per_seed"][0][0] == pytest.approx(4.0) and eq["a"]["per_seed"][1][0] == pytest.approx(5.0)
    assert eq["a"]["domain"]["mean"] == pytest.approx(4.5)


def test_flops_formula_on_demo_config():
    from nexus import demo_data

    model = L.load_base_model(str(demo_data.DEMO_MODEL_DIR), dtype=torch.float32)
    a = L.active_params(model)
    c = model.config
    h, i, e, k, layers = c.hidden_size, c.intermediate_size, c.num_local_experts, c.num_experts_per_tok, 4
    per_expert = h * 2 * i + 2 * i + i * h + h  # gate_up (H, 2I) + bias, down (I, H) + bias (GPT-OSS)
    assert a["experts"] == layers * e * per_expert
    assert a["embedding"] == c.vocab_size * h
    assert a["active"] == a["total"] - c.vocab_size * h - layers * e * per_expert + layers * k * per_expert
    nexus = L.nexus_param_count(str(demo_data.DEMO_MODEL_DIR))
    assert nexus == layers * per_expert  # width 1×: one expert-sized shared expert per MoE layer
    assert L.flops_per_token(a["active"], nexus) == 2 * a["active"] + 2 * nexus
    assert L.flops_per_token(a["active"]) == 2 * a["active"]


def test_resume_skips_finished_runs(tmp_path):
    path = tmp_path / "results.jsonl"
    grid = [(m, lr, s) for s in (0, 1) for m in ("nexus-random", "esft") for lr in (1e-3, 1e-2)]
    assert study.pending(grid, path) == grid  # no file yet
    path.write_text(json.dumps(_row("esft", 0.01, 1, 1, 1)) + "\n" + json.dumps(_row("nexus-random", 1e-3, 0, 1, 1)) + "\n")
    todo = study.pending(grid, path)
    assert len(todo) == len(grid) - 2
    assert ("esft", 1e-2, 1) not in todo and ("nexus-random", 1e-3, 0) not in todo and ("esft", 1e-2, 0) in todo


def test_esft_split_out_experts_train_alone():
    from nexus import demo_data
    from nexus.moe import find_moe_blocks

    model_dir = str(demo_data.DEMO_MODEL_DIR)
    chosen = {0: [3], 1: [0, 5], 2: [1], 3: [31]}
    m, n = L.esft_model(model_dir, chosen)
    base = L.load_base_model(model_dir, dtype=torch.float32)
    per_expert = sum(p[0].numel() for p in find_moe_blocks(base)[0].experts.parameters())
    assert n == 5 * per_expert  # only the chosen slices are parameters that train
    assert all("delta" in name for name, p in m.named_parameters() if p.requires_grad)
    ids = torch.randint(3, 4000, (2, 16))
    with torch.no_grad():
        assert torch.allclose(m(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-6)
    m(input_ids=ids, labels=ids).loss.backward()
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(0.01)
    plain = L.merged(m)
    plain2 = L.merged(m)  # scoring leaves the trained model intact (twice, then a forward)
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), plain2.parameters()))
    m(input_ids=ids)
    for b, bb in zip(find_moe_blocks(plain), find_moe_blocks(base)):
        for (name, w), w0 in zip(b.experts.named_parameters(), bb.experts.parameters()):
            moved = (w - w0).flatten(1).abs().amax(1) > 0  # (E,)
            assert moved.nonzero().flatten().tolist() == chosen[b.layer], name


def test_step0_scores_reused_only_for_the_same_start_model(tmp_path):
    path = tmp_path / "results.jsonl"
    prints = {"model_sha256": "a" * 64, "data_sha256": "d" * 64}
    proto = {"seq_len": 128, "eval_num": None, "model": "m", **prints}
    rows = [{**_row("nexus-random", 1e-3, 0, 1, 1), **prints, "protocol": {"seq_len": 128, "eval_num": None}},
            {**_row("lora-attn", 1e-3, 0, 1, 1), **prints, "protocol": {"seq_len": 128, "eval_num": None}}]
    rows[0]["start"]["tag"], rows[1]["start"]["tag"] = "nexus-random-s0", "base"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert study.cached_start(path, "nexus-random-router", 0, proto)["tag"] == "nexus-random-s0"
    assert study.cached_start(path, "nexus-random", 1, proto) is None  # another seed: another random init
    assert study.cached_start(path, "nexus-pca_top8", 0, proto) is None
    assert study.cached_start(path, "esft", 2, proto)["tag"] == "base"  # every non-NEXUS method starts at the base
    assert study.cached_start(path, "esft", 2, {**proto, "eval_num": 8}) is None
    # another --hidden-tokens: pruned/feature adapters rank their units on another sample
    assert study.cached_start(path, "nexus-random", 0, {**proto, "hidden_tokens": 2048}) is None
    # the same path holding other weights (a testbed rebuilt elsewhere), or other data: measured afresh
    assert study.cached_start(path, "esft", 2, {**proto, "model_sha256": "b" * 64}) is None
    assert study.cached_start(path, "esft", 2, {**proto, "data_sha256": "e" * 64}) is None
    path.write_text("".join(json.dumps({k: v for k, v in r.items() if k not in prints}) + "\n" for r in rows))
    assert study.cached_start(path, "esft", 2, proto) is None  # a row without digests cannot vouch for its model


def test_digest_follows_the_bytes_not_the_path(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
        (d / "config.json").write_text("{}")
        (d / "model.safetensors").write_bytes(bytes(range(256)) * 10)
        (d / "notes.txt").write_text(d.name)  # not part of the model
    assert study.digest([a]) == study.digest([b])
    (b / "model.safetensors").write_bytes(bytes(range(256)) * 9 + bytes([1]) + bytes(range(1, 256)))
    assert study.digest([a]) != study.digest([b])
    before = study.digest([a])
    (a / "model-00002.safetensors").write_bytes(b"")  # a new shard, even an empty one, is another model
    assert study.digest([a]) != before
    assert study.digest([a]) != study.digest([tmp_path / "a" / "config.json"])


def test_a_work_directory_prepared_from_other_weights_is_refused(tmp_path):
    args = argparse.Namespace(model="m", domain_train="t", domain_eval="e", general_eval="g", val_frac=0.1,
                              stats_tokens=10, esft_threshold=0.3, seq_len=16, hidden_tokens=0)
    inputs = vars(args) | {"model_sha256": "a" * 64, "data_sha256": "d" * 64}
    (tmp_path / "setup.json").write_text(json.dumps({"inputs": inputs, "esft": {}}))
    assert study.prepare(args, tmp_path, {"model_sha256": "a" * 64, "data_sha256": "d" * 64})["inputs"] == inputs
    with pytest.raises(SystemExit, match=r"\(model_sha256 'a+' -> 'b+'\); use another --work"):
        study.prepare(args, tmp_path, {"model_sha256": "b" * 64, "data_sha256": "d" * 64})


def test_report_refuses_runs_of_different_weights(tmp_path):
    rows = [dict(_row("p", 3e-3, 0, 5.0, 4.0), model_sha256="a" * 64),
            dict(_row("q", 3e-3, 0, 4.0, 4.0), model_sha256="b" * 64), _row("r", 3e-3, 0, 4.0, 4.0)]
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(SystemExit, match=r"different model_sha256 \(aaaaaaaaaaaa… \(1 runs\), bbbbbbbbbbbb… \(1 runs\)\)"):
        R.write_report(path, tmp_path / "out")
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[::2]))  # one digest, and a row from before digests
    assert "## Answers" in R.write_report(path, tmp_path / "out")
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps(rows[1]) + "\n")
    with pytest.raises(SystemExit, match="other.jsonl: runs with different model_sha256"):
        R.write_report(path, tmp_path / "out", beside=other)


def test_rows_name_the_cpu_and_kernels_and_the_report_says_them():
    m = study.machine()
    assert m["cpu_kernels"] == torch.backends.cpu.get_cpu_capability() and m["cpu"]
    amd = {"cpu": "AMD EPYC", "cpu_kernels": "AVX2"}
    rows = [dict(_row("p", 3e-3, 0, 5.0, 4.0), **amd), dict(_row("q", 3e-3, 0, 4.0, 4.0), **amd)]
    assert R.machines(rows) == "; on AMD EPYC (AVX2 kernels)"
    rows.append(dict(_row("r", 3e-3, 0, 4.0, 4.0), cpu="Intel Xeon", cpu_kernels="AVX512"))
    assert R.machines(rows) == "; on AMD EPYC (AVX2 kernels): 2 runs, Intel Xeon (AVX512 kernels): 1 runs"
    assert R.machines([_row("s", 3e-3, 0, 4.0, 4.0)]) == ""  # rows from before study.py recorded the CPU


def test_one_shared_seed_gives_the_difference_and_says_once_there_is_no_noise_estimate():
    rows = [_row("nexus-random", 3e-3, 0, 8.0, 4.0), _row("esft", 3e-3, 0, 11.0, 3.5),
            _row("esft", 3e-3, 1, 11.5, 3.0)]  # esft's second seed has no partner
    pts = R.points(rows)
    assert R.verdict(pts["nexus-random"][3e-3], pts["esft"][3e-3]) == "-3.00 pt on seed 0 alone"
    (h,) = R.head_to_head(pts)
    assert (h["domain"], h["general"]) == ("-3.00 pt on seed 0 alone", "+0.50 pt on seed 0 alone")
    assert h["overall"] == "one seed, no estimate of seed noise"
    text = "\n".join(R.answers(pts, R.best_under(pts)))
    assert "general +3.25 ± 0.35 %): -3.00 pt on seed 0 alone." in text
    assert "At equal cost, nexus-random against esft: -2.29 pt on seed 0 alone." in text
    # one seed has no spread: its value alone, never "± 0.00"
    assert "Best NEXUS setting: **nexus-random** (lr 0.003: domain +8.00 %, general +4.00 %)." in text


def test_methods_and_inits_are_checked_before_any_setup(tmp_path, capsys):
    for argv, expected in (
            (["--methods", "esfft"], "--methods: unknown esfft (expected some of: nexus-random, "),
            (["--nexus-inits", "random", "--methods", "nexus-pruned_top8"],  # not in --nexus-inits
             "--methods: unknown nexus-pruned_top8"),
            (["--nexus-inits", "esft", "--methods", "nexus-esft"], "--nexus-inits 'esft': not an init the study runs"),
            (["--nexus-inits", "concat_top2"], "--nexus-inits 'concat_top2': not an init"),  # twice as wide
            (["--router-init", "zero"], "--router-init 'zero': not an init")):
        with pytest.raises(SystemExit):
            study.main(argv + ["--model", str(tmp_path / "no-model"), "--work", str(tmp_path / "work"),
                               "--out", str(tmp_path / "out"), "--max-steps", "1"])
        assert expected in capsys.readouterr().err
    assert not (tmp_path / "work").exists() and not (tmp_path / "out").exists()
    # an init that does not run is not checked: the recorded commands of earlier ESFT runs stay valid
    args = argparse.Namespace(nexus_inits=["esft"], router_init="random", methods=["esft"])
    assert study.check_methods(args) is None
    args.methods = ["nexus-random-router", "lora-attn"]
    assert study.check_methods(args) is None
