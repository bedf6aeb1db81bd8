r"""Train the shared experts by distillation from the unmodified model plus LM loss.

    nexus train --student-model adapter/ --dataset data.jsonl --seq-len 1024 \
        --batch-size 1 --gradient-accumulation-steps 4 --max-steps 10000 --learning-rate 1e-5 \
        --use-advanced-scheduler --output-dir out/

    nexus train --student-model base/ --init-strategy random ...   # attach shared experts on the fly
    nexus train ... --use-ddp --nproc 2              # = torchrun --nproc-per-node 2 -m nexus train ...
    nexus train ... --shard-base --nproc 8           # the frozen base sharded over 8 ranks (FSDP2)
    nexus train ... --precomputed-teacher cache/     # offline distillation
    nexus train ... --resume-from-checkpoint latest  # continue exactly
    nexus train ... --eval-dataset d.jsonl --general-eval-dataset g.jsonl   # best/ under +5 % general loss

The teacher is the student's own base (shared experts switched off; no second copy) unless
--teacher-model names another model. Writes OUTPUT_DIR/metrics.jsonl, checkpoint-N/ (each an adapter
directory) and final/; with --general-eval-dataset also best/, the adapter with the lowest eval CE whose
general-text loss stays under --max-general-increase. See docs/train.md.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ...errors import NexusError
from ...flags import add_flags
from ...launch import relaunch, under_torchrun
from ...rerun import command
from ..config import TrainConfig

GROUPS = {  # --help's sections: TrainConfig's fields in the order shown
    "model and data": ["student_model", "init_strategy", "width_multiplier", "gate", "teacher_model", "teacher_device",
                       "precomputed_teacher", "dataset", "text_field", "split", "eval_dataset", "eval_every",
                       "general_eval_dataset", "max_general_increase", "replay_dataset", "replay_weight",
                       "replay_batches", "seq_len", "pack", "dtype", "dequantize", "device"],
    "loss": ["ce_weight", "kl_weight", "router_kl_weight", "temperature", "final_temperature",
             "temperature_anneal_start", "kl_weight_warmup", "kl_chunk_size"],
    "router": ["freeze_router", "bias_freeze_ratio"],
    "optimization": ["learning_rate", "down_lr_ratio", "weight_decay", "batch_size", "gradient_accumulation_steps", "max_steps",
                     "gradient_clip_val", "gradient_checkpointing", "use_advanced_scheduler", "warmup_ratio",
                     "stable_ratio", "final_lr_ratio", "sfa_interval", "sfa_alpha", "seed"],
    "output": ["output_dir", "checkpoint_interval", "save_total_limit", "resume_from_checkpoint", "logging_steps",
               "kl_warn_threshold", "grad_spike_threshold", "router_l1_warn_threshold"],
    "distributed": ["shard_base"],  # and --use-ddp, --nproc (launcher flags, not TrainConfig fields)
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    groups = {title: p.add_argument_group(title) for title in GROUPS}
    for title, names in GROUPS.items():
        add_flags(groups[title], TrainConfig, names)
    g = groups["distributed"]
    g.add_argument("--use-ddp", action="store_true", help="launch torchrun with --nproc processes for this command")
    g.add_argument("--nproc", type=int, help="processes for --use-ddp or --shard-base (default: GPU count, or 2 on "
                                             "CPU)")


RESUME = ("--resume-from-checkpoint", "latest")


def _resume_command(args) -> str:
    return command(args, add=RESUME, drop={"--resume-from-checkpoint": 1})


def _check_output_dir(args) -> None:
    """A run already in --output-dir is continued only when asked; the refusal gives the commands."""
    from .. import checkpoint as ckpt
    from ..recipe import holds_run

    if args.resume_from_checkpoint or int(os.environ.get("RANK", "0")) != 0 or not holds_run(args.output_dir):
        return  # (under torchrun rank 0 checks, before any rank writes)
    found = ckpt.checkpoints(args.output_dir)
    what = "a finished run" if (Path(args.output_dir) / "final").exists() else \
        (f"an interrupted run (last checkpoint: {found[-1][1].name})" if found else
         "an interrupted run with no checkpoint yet")
    raise NexusError(f"--output-dir {args.output_dir} holds {what}; continue it with: {_resume_command(args)} ; "
                     f"or start over in another directory (or delete this one)")


def interrupted(args) -> str:
    """The Ctrl-C message: the checkpoint to continue from and the command that does."""
    from .. import checkpoint as ckpt

    found = ckpt.checkpoints(args.output_dir)
    where = f"{found[-1][1]} is the latest checkpoint" if found else \
        f"no checkpoint was written yet (one every --checkpoint-interval {args.checkpoint_interval} steps)"
    return f"{where}; continue with: {_resume_command(args)}"


def check_options(args) -> None:
    """Flag values alone (no file access); `nexus pipeline` checks these before any stage runs."""
    TrainConfig.from_args(args).check()


def run(args) -> int:
    _check_output_dir(args)
    if args.use_ddp and args.shard_base:
        raise NexusError("--use-ddp replicates the base, --shard-base shards it: pass one of them")
    if (args.use_ddp or args.shard_base) and not under_torchrun():
        check_options(args)  # before any process starts
        return relaunch(args, "--shard-base" if args.shard_base else "--use-ddp")  # --shard-base stays on it
    from ..recipe import Trainer

    trainer = Trainer(TrainConfig.from_args(args))
    try:
        trainer.setup()
        trainer.train()
    finally:
        trainer.cleanup()
    return 0
