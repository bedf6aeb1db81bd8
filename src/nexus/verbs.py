"""The verb registry: each `nexus` verb and the module that implements it.

A verb module has `add_arguments(parser)` and `run(args) -> int` (optionally `interrupted(args)` for
the Ctrl-C message and `check_options(args)` for the checks `nexus pipeline` makes before any stage
runs); its docstring is the verb's `--help` description. Every verb module is a `cli` module of its
stage (`convert/cli.py`, `stats/cli/collect.py`), so its logic lives below it. `nexus.cli` builds the
parser from this table and `nexus.pipeline` runs stages through it.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# verb -> module (relative to the package). Order is the pipeline order shown in --help.
VERBS = {
    "plan": ".plan.cli",
    "sample": ".stats.cli.sample",
    "collect": ".stats.cli.collect",
    "analyze": ".stats.cli.analyze",
    "convert": ".convert.cli",
    "precompute-teacher": ".teacher.cli",
    "train": ".train.cli.train",
    "validate": ".validate.cli",
    "chat": ".chat.cli",
    "plot-metrics": ".train.cli.plot_metrics",
    "pipeline": ".pipeline.cli",
    "demo": ".demo.cli",
}


def verb_module(verb: str) -> ModuleType:
    """The module of `verb` (imported on first use)."""
    return importlib.import_module(VERBS[verb], __package__)
