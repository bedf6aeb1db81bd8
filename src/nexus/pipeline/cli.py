"""Run the whole pipeline from one YAML file, skipping finished stages.

    nexus pipeline configs/demo.yaml                 # every stage, in order
    nexus pipeline configs/demo.yaml --from train    # rerun train and what follows
    nexus pipeline configs/demo.yaml --only analyze  # one stage

The file names the model, the data and each stage's options; option names are the stage's own
flags (`target_tokens: 1000000` is `--target-tokens 1000000`); relative paths are relative to the
directory the command runs in, as on the command line. Outputs go under `work_dir`, and
each stage's inputs are wired to the previous stages' outputs unless the file sets them. A stage
whose output exists is complete (every stage writes its output atomically) and is skipped; an
interrupted stage resumes where the stage supports it.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..errors import NexusError
from .runner import STAGES, load_pipeline_config, run_pipeline


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="pipeline YAML file (see configs/ for examples)")
    p.add_argument("--from", dest="start", choices=STAGES, help="rerun this stage and every later one")
    p.add_argument("--only", choices=STAGES, help="run only this stage (rerun even if complete)")
    p.add_argument("--dry-run", action="store_true", help="print each stage's command without running it")


def interrupted(args) -> str:
    """The Ctrl-C message: the command that skips the finished stages and resumes the interrupted one."""
    from ..rerun import command

    again = command(args, drop={"--from": 1, "--only": 1, "--dry-run": 0})
    return f"finished stages are kept; continue with: {again} (it skips them; an interrupted collect or train resumes)"


def run(args) -> int:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # every rank would run every stage
        raise NexusError("nexus pipeline runs each stage once: start it without torchrun, and give the train "
                         "stage `use_ddp: true` (and `nproc: N`) to train on N processes, or a stage "
                         "`shard_base: true` (and `nproc: N`) to shard the base over N processes")
    run_pipeline(load_pipeline_config(args.config), Path.cwd(), args.start, args.only, args.dry_run, source=args.config)
    return 0
