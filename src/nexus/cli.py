"""The `nexus` command line: one verb per pipeline stage, registered in `VERBS`.

Each verb lives in its own module with `add_arguments(parser)` and `run(args) -> int`; the module's
docstring is the verb's `--help` description. Modules are imported when the parser is built, so a
verb is listed only if it exists.

User errors (`NexusError`) print `error: ...` and exit 2, without a traceback unless `--debug`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from .errors import NexusError

# verb -> module (relative to the package). Order is the pipeline order shown in --help.
VERBS = {
    "plan": ".plan",
    "sample": ".stats.sample",
    "collect": ".stats.collect",
    "analyze": ".stats.analyze",
    "convert": ".convert",
    "precompute-teacher": ".teacher.cli",
    "train": ".train.cli",
    "validate": ".validate.cli",
    "chat": ".chat",
    "plot-metrics": ".train.plots",
    "pipeline": ".pipeline",
    "demo": ".demo",
}


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="nexus",
        description="NEXUS: add trainable shared experts to a Mixture-of-Experts model and specialize it "
                    "by distillation. Pipeline: sample -> collect -> analyze -> convert -> "
                    "(precompute-teacher) -> train -> validate / chat.",
    )
    parser.add_argument("--version", action="version", version=f"nexus {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for verb, modname in VERBS.items():
        mod = importlib.import_module(modname, __package__)
        doc = (mod.__doc__ or "").strip()
        p = sub.add_parser(verb, help=doc.splitlines()[0] if doc else None, description=doc,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show full tracebacks for errors")
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    args._argv = list(sys.argv[1:] if argv is None else argv)  # for verbs that relaunch themselves (--use-ddp)
    try:
        code = args._run(args)
    except NexusError as e:
        if getattr(args, "debug", False):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
