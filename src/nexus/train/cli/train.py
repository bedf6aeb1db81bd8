r"""Train the shared experts by distillation from the unmodified model plus LM loss.

    nexus train --student-model adapter/ --dataset data.jsonl --seq-len 1024 \
        --batch-size 1 --gradient-accumulation-steps 4 --max-steps 10000 --learning-rate 1e-5 \
        --use-advanced-scheduler --output-dir out/

    nexus train --student-model base/ --init-strategy random ...   # attach shared experts on the fly
    nexus train ... --use-ddp --nproc 2              # = torchrun --nproc-per-node 2 -m nexus train ...
    nexus train ... --precomputed-teacher cache/     # offline distillation
    nexus train ... --resume-from-checkpoint latest  # continue exactly

The teacher is the student's own base (shared experts switched off; no second copy) unless
--teacher-model names another model. Writes OUTPUT_DIR/metrics.jsonl, checkpoint-N/ (each an adapter
directory) and final/. See docs/train.md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from ...base.loader import DEQUANTIZE_HELP
from ...defaults import SEQ_LEN_HELP
from ...errors import NexusError
from ...rerun import command
from ..config import TrainConfig

_D = {f: TrainConfig.__dataclass_fields__[f].default for f in TrainConfig.__dataclass_fields__}


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and data")
    g.add_argument("--student-model", required=True,
                   help="adapter directory (its base is resolved), or a base model with --init-strategy")
    g.add_argument("--init-strategy", choices=("zero", "random"), help="initialize shared experts on a base model")
    g.add_argument("--width-multiplier", type=float, default=1, metavar="M",
                   help="shared expert width × a routed expert's, e.g. 2 or 0.25 (base model only; default 1)")
    g.add_argument("--teacher-model", help="teacher (default: the student's own base, run without shared experts)")
    g.add_argument("--teacher-device", help="device of a separate --teacher-model (default: --device)")
    g.add_argument("--precomputed-teacher", metavar="DIR", help="teacher cache from `nexus precompute-teacher`")
    g.add_argument("--dataset", help="training data: .txt/.jsonl/.json/.parquet file, folder, or saved HF dataset")
    g.add_argument("--text-field", default=_D["text_field"], help="record field holding the text (else `messages`)")
    g.add_argument("--split", help="split of a saved HF DatasetDict")
    g.add_argument("--eval-dataset", help="held-out data for eval_loss")
    g.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (and at the end)")
    g.add_argument("--seq-len", type=int, default=_D["seq_len"],
                   help=f"tokens per sequence (with --precomputed-teacher: the cache's) {SEQ_LEN_HELP}")
    g.add_argument("--no-pack", dest="pack", action="store_false",
                   help="one document per sequence, right-padded (padding is masked out), instead of packing")
    g.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="dtype of the frozen base (trainable weights are always fp32)")
    g.add_argument("--dequantize", action="store_true", help=DEQUANTIZE_HELP)
    g.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda if available; under torchrun, this rank's GPU)")

    g = p.add_argument_group("loss")
    g.add_argument("--ce-weight", type=float, default=_D["ce_weight"],
                   help='weight of the cross-entropy (LM) loss on the data')
    g.add_argument("--kl-weight", type=float, default=_D["kl_weight"], help="0 disables the teacher")
    g.add_argument("--router-kl-weight", type=float, default=_D["router_kl_weight"],
                   help="KL between teacher and student router probabilities, mean over layers")
    g.add_argument("--temperature", type=float, default=_D["temperature"],
                   help='distillation temperature T (start value when annealing)')
    g.add_argument("--final-temperature", type=float, default=_D["final_temperature"],
                   help="with --use-advanced-scheduler")
    g.add_argument("--temperature-anneal-start", type=float, default=_D["temperature_anneal_start"],
                   help="fraction of --max-steps where annealing starts (advanced scheduler)")
    g.add_argument("--kl-weight-warmup", action="store_true", help="ramp the KL weight 0 -> --kl-weight over warmup")
    g.add_argument("--kl-chunk-size", type=int, default=0, help="positions per LM-head chunk (0: from the vocab size)")

    g = p.add_argument_group("router")
    g.add_argument("--freeze-router", action=argparse.BooleanOptionalAction, default=None,
                   help="keep routers frozen (the default; --no-freeze-router trains them)")
    g.add_argument("--bias-freeze-ratio", type=float,
                   help="trainable router is frozen after this fraction of --max-steps (default 0.5); "
                        "implies --no-freeze-router unless --freeze-router is given")

    g = p.add_argument_group("optimization")
    g.add_argument("--learning-rate", type=float, default=_D["learning_rate"],
                   help='peak learning rate of AdamW')
    g.add_argument("--weight-decay", type=float, default=_D["weight_decay"],
                   help='AdamW weight decay on the trainable weights')
    g.add_argument("--batch-size", type=int, default=_D["batch_size"], help="sequences per micro-batch per rank")
    g.add_argument("--gradient-accumulation-steps", type=int, default=_D["gradient_accumulation_steps"],
                   help='micro-batches accumulated per optimizer step')
    g.add_argument("--max-steps", type=int, default=_D["max_steps"],
                   help='optimizer steps to train for')
    g.add_argument("--gradient-clip-val", type=float, default=_D["gradient_clip_val"], help="0 disables clipping")
    g.add_argument("--gradient-checkpointing", action="store_true",
                   help='recompute decoder layers in backward to save activation memory')
    g.add_argument("--use-advanced-scheduler", action="store_true",
                   help="DeepSeek-V3 style: warmup, stable, cosine decay; temperature annealing")
    g.add_argument("--warmup-ratio", type=float, default=_D["warmup_ratio"],
                   help='fraction of --max-steps with linear LR warmup, in [0, 1)')
    g.add_argument("--stable-ratio", type=float, default=_D["stable_ratio"], help="advanced scheduler")
    g.add_argument("--final-lr-ratio", type=float, default=_D["final_lr_ratio"], help="advanced scheduler")
    g.add_argument("--sfa-interval", type=int, default=0,
                   help="every N steps set trainable = α·anchor + (1−α)·current (anchor: the initial weights)")
    g.add_argument("--sfa-alpha", type=float, default=_D["sfa_alpha"],
                   help='SFA anchor weight: trainable = alpha * anchor + (1 - alpha) * current')
    g.add_argument("--seed", type=int, default=_D["seed"], help="data order, init and RNG")

    g = p.add_argument_group("output")
    g.add_argument("--output-dir", required=True,
                   help='run directory: metrics.jsonl, checkpoint-N/, final/')
    g.add_argument("--checkpoint-interval", type=int, default=_D["checkpoint_interval"],
                   help='save checkpoint-N/ every this many steps')
    g.add_argument("--save-total-limit", type=int, help="keep only the newest N checkpoints")
    g.add_argument("--resume-from-checkpoint", metavar="PATH|latest",
                   help='continue exactly from a checkpoint directory, or the latest in --output-dir')
    g.add_argument("--logging-steps", type=int, default=_D["logging_steps"], help="console line every N steps")
    g.add_argument("--kl-warn-threshold", type=float, default=_D["kl_warn_threshold"],
                   help='warn when the KL exceeds this (possible collapse or divergence)')
    g.add_argument("--grad-spike-threshold", type=float, default=_D["grad_spike_threshold"],
                   help='warn when the pre-clip gradient norm exceeds this')
    g.add_argument("--router-l1-warn-threshold", type=float, default=_D["router_l1_warn_threshold"],
                   help='warn when router L1 drift from the teacher exceeds this')

    g = p.add_argument_group("distributed")
    g.add_argument("--use-ddp", action="store_true", help="launch torchrun with --nproc processes for this command")
    g.add_argument("--nproc", type=int, help="processes for --use-ddp (default: GPU count, or 2 on CPU)")


def _launch_ddp(args) -> int:
    import torch

    nproc = args.nproc or torch.cuda.device_count() or 2
    # The command line of this train command alone (set by `nexus.cli.main` and by the pipeline); never
    # sys.argv, which under `nexus pipeline` would relaunch every stage on every rank.
    argv = getattr(args, "argv", None)
    if argv is None:
        raise NexusError("--use-ddp: the train command line to relaunch is unknown (run `nexus train`)")
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--use-ddp":
            continue
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "nexus",
           *out]
    print("launching: " + " ".join(cmd), flush=True)
    return subprocess.call(cmd, env=dict(os.environ))


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
    if args.use_ddp and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return _launch_ddp(args)
    from ..recipe import Trainer

    trainer = Trainer(TrainConfig.from_args(args))
    try:
        trainer.setup()
        trainer.train()
    finally:
        trainer.cleanup()
    return 0
