"""Flags generated from the settings dataclasses, and the one --dtype table."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import torch

from nexus.cli import build_parser
from nexus.device import canonical_dtype, torch_dtype
from nexus.errors import NexusError
from nexus.flags import add_flags, flag, from_args
from nexus.teacher.precompute import PrecomputeConfig
from nexus.train.config import TrainConfig
from nexus.train.metrics import Thresholds
from nexus.train.schedule import Schedule

TRAIN_REQUIRED = ["train", "--student-model", "s", "--output-dir", "o"]
PRECOMPUTE_REQUIRED = ["precompute-teacher", "--model", "m", "--dataset", "d", "--output", "c", "--num-steps", "3"]


def test_train_flags_default_to_the_dataclass_and_every_field_is_a_flag():
    args = build_parser().parse_args(TRAIN_REQUIRED)
    assert TrainConfig.from_args(args) == TrainConfig(student_model="s", output_dir="o")
    for f in dataclasses.fields(TrainConfig):
        assert hasattr(args, f.name), f"TrainConfig.{f.name} has no flag"


def test_precompute_flags_default_to_the_dataclass_and_every_field_is_a_flag():
    args = build_parser().parse_args(PRECOMPUTE_REQUIRED)
    assert from_args(PrecomputeConfig, args) == PrecomputeConfig(model="m", dataset="d", output="c", num_steps=3)
    assert all(hasattr(args, f.name) for f in dataclasses.fields(PrecomputeConfig))
    with pytest.raises(SystemExit):  # exactly one of --num-sequences / --num-steps
        build_parser().parse_args([*PRECOMPUTE_REQUIRED, "--num-sequences", "4"])


def test_schedule_and_warning_defaults_have_one_source():
    cfg = TrainConfig(student_model="s", output_dir="o")
    assert cfg.schedule() == Schedule(max_steps=cfg.max_steps, peak_lr=cfg.learning_rate)
    assert (cfg.kl_warn_threshold, cfg.grad_spike_threshold, cfg.router_l1_warn_threshold) == \
        dataclasses.astuple(Thresholds())


def test_flag_values_parse_to_their_types():
    args = build_parser().parse_args([*TRAIN_REQUIRED, "--no-pack", "--no-freeze-router", "--width-multiplier", "0.25",
                                      "--max-steps", "7", "--gradient-checkpointing"])
    cfg = TrainConfig.from_args(args)
    assert (cfg.pack, cfg.freeze_router, cfg.width_multiplier, cfg.max_steps, cfg.gradient_checkpointing) == \
        (False, False, 0.25, 7, True)
    assert build_parser().parse_args([*TRAIN_REQUIRED, "--freeze-router"]).freeze_router is True
    assert build_parser().parse_args(TRAIN_REQUIRED).freeze_router is None


@pytest.mark.parametrize("argv", [TRAIN_REQUIRED, PRECOMPUTE_REQUIRED, ["validate", "--model", "m", "--dataset", "d"],
                                  ["chat", "--model", "m"], ["collect", "--model", "m", "--dataset", "d"]])
def test_every_verb_takes_the_same_dtype_names(argv, capsys):
    parse = build_parser().parse_args
    assert parse([*argv, "--dtype", "bf16"]).dtype == parse([*argv, "--dtype", "bfloat16"]).dtype == "bfloat16"
    assert parse([*argv, "--dtype", "fp32"]).dtype == "float32" and parse(argv).dtype == "auto"
    with pytest.raises(SystemExit) as e:
        parse([*argv, "--dtype", "bf17"])
    assert e.value.code == 2 and "--dtype" in capsys.readouterr().err


def test_dtype_table():
    assert torch_dtype("bf16") is torch.bfloat16 and torch_dtype("auto") == "auto"
    assert canonical_dtype("fp16") == "float16"
    with pytest.raises(NexusError, match="--dtype must be one of"):
        TrainConfig(student_model="s", output_dir="o", dataset="d", dtype="int8").check()


def test_generated_flags_cover_the_field_kinds():
    @dataclasses.dataclass
    class S:
        name: str = flag(help="required")
        n: int | None = flag(None, "optional int")
        x: float = flag(0.5, "a float")
        on: bool = flag(False, "a switch")
        keep: bool = flag(True, "on unless --no-keep", negate="--no-keep")
        maybe: bool | None = flag(None, "three states")

    p = argparse.ArgumentParser()
    add_flags(p, S, [f.name for f in dataclasses.fields(S)])
    assert from_args(S, p.parse_args(["--name", "a"])) == S(name="a")
    got = from_args(S, p.parse_args(["--name", "a", "--n", "3", "--x", "2", "--on", "--no-keep", "--no-maybe"]))
    assert got == S(name="a", n=3, x=2.0, on=True, keep=False, maybe=False)
    assert "(default 0.5)" in p.format_help()
    with pytest.raises(SystemExit):
        p.parse_args([])  # --name is required


def test_verb_flags_default_to_their_functions_signature():
    """sample, analyze and convert: each flag's default is the function's own (one place)."""
    import inspect

    from nexus.convert.cli import FLAGS as CONVERT
    from nexus.convert.core import convert
    from nexus.stats.analyze import analyze
    from nexus.stats.cli.analyze import FLAGS as ANALYZE
    from nexus.stats.cli.sample import FLAGS as SAMPLE
    from nexus.stats.sample import sample

    parse = build_parser().parse_args
    cases = [(sample, SAMPLE, ["sample", "--dataset", "d", "--tokenizer", "t"]),
             (analyze, ANALYZE, ["analyze", "--input", "s"]),
             (convert, CONVERT, ["convert", "--input", "m", "--output", "a"])]
    for func, flags, argv in cases:
        args = parse(argv)
        for name, p in inspect.signature(func).parameters.items():
            if name in flags and p.default is not inspect.Parameter.empty:
                assert getattr(args, name) == p.default, f"{func.__name__}: --{name} default"
    assert parse(["convert", "--model", "m", "--output-dir", "a", "--init-strategy", "zero", "--skip-check"]).check \
        is False  # the alias spellings and the negated switch
    assert parse(["analyze", "--input", "s", "--no-plots"]).plots is False
