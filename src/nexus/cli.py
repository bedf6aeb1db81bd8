"""The `nexus` command line: one verb per pipeline stage, registered in `nexus.verbs.VERBS`.

Each verb lives in its own module with `add_arguments(parser)` and `run(args) -> int`; the module's
docstring is the verb's `--help` description (the table and the contract: `nexus.verbs`). Modules are
imported when the parser is built, so a verb is listed only if it exists.

Ctrl-C prints `interrupted; ...` with what the verb keeps and the exact command that continues it
(a module's `interrupted(args)`), and exits 130. User errors (`NexusError`, a full disk) print
`error: ...` and exit 2, without a traceback unless `--debug`; a process of a torchrun job that lost
the others says so and exits 1. Anything else is a bug and keeps its traceback. No parser accepts an
abbreviated flag (`allow_abbrev=False`): a misspelling is an error, never another flag.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import re
import sys

from .errors import NexusError
from .fsutil import WRITE_ERRNOS
from .verbs import VERBS, verb_module

def build_parser() -> argparse.ArgumentParser:
    from .version import __version__

    parser = argparse.ArgumentParser(
        prog="nexus", allow_abbrev=False,
        description="NEXUS: add trainable shared experts to a Mixture-of-Experts model and specialize it "
                    "by distillation. Pipeline: sample -> collect -> analyze -> convert -> "
                    "(precompute-teacher) -> train -> validate / chat.",
    )
    parser.add_argument("--version", action="version", version=f"nexus {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for verb in VERBS:
        mod = verb_module(verb)
        doc = (mod.__doc__ or "").strip()
        p = sub.add_parser(verb, help=doc.splitlines()[0] if doc else None, description=doc, allow_abbrev=False,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show full tracebacks for errors")
        mod.add_arguments(p)
        p.set_defaults(verb_module=mod)
    return parser


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for verbs that relaunch themselves (--use-ddp)
    try:
        code = args.verb_module.run(args)
    except KeyboardInterrupt:
        hint = interrupted_hint(args)
        if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one message for the job
            print("interrupted" + (f"; {hint}" if hint else ""), file=sys.stderr)
        _exit(130)
    except Exception as e:
        described = describe_error(e)
        if described is None or getattr(args, "debug", False):
            raise
        message, exit_code = described
        print(f"error: {message}", file=sys.stderr)
        _exit(exit_code)
    _exit(code or 0)


def interrupted_hint(args) -> str | None:
    """What the verb left behind after Ctrl-C and the command that continues it (`interrupted(args)` of its module)."""
    hint = getattr(getattr(args, "verb_module", None), "interrupted", None)
    if hint is None:
        return None
    try:
        return hint(args)
    except Exception:  # a hint must never hide the interruption itself
        return None


def _exit(code: int) -> None:
    from . import dist

    if dist.joined():  # a torchrun worker: skip the C++ teardown that can abort a finished job
        dist.exit_process(code)
    sys.exit(code)


# What a collective operation raises when another rank died or stopped answering (gloo, NCCL).
_PEER_LOST = re.compile(r"closed by peer|reset by peer|broken pipe|timed out|timeout|NCCL", re.IGNORECASE)


def describe_error(e: Exception) -> tuple[str, int] | None:
    """(message, exit code) for an error the user can act on; None for a bug (it keeps its traceback).

    User errors exit 2; a rank that lost the rest of its torchrun job exits 1 (torchrun's summary
    names the process that failed first).
    """
    if isinstance(e, NexusError):
        return str(e), 2
    if isinstance(e, OSError) and e.errno in (*WRITE_ERRNOS, errno.EACCES):  # a full disk outside our writers
        return f"{e.filename + ': ' if e.filename else ''}{e.strerror}", 2
    if isinstance(e, RuntimeError) and int(os.environ.get("WORLD_SIZE", "1")) > 1 and _PEER_LOST.search(str(e)):
        first = str(e).splitlines()[0][:300]
        return (f"rank {os.environ.get('RANK', '?')}: lost contact with the other processes of this job ({first}); "
                f"stopping. torchrun's summary names the process that failed first; run the same command again "
                f"to continue (train: add --resume-from-checkpoint latest, collect: add --resume)"), 1
    return None
