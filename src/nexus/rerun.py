"""The exact command line that continues, or starts over, an interrupted verb.

Messages after Ctrl-C, and refusals to touch a partial output, print a command the user can copy:
the one that was run, with the flags that resume (or overwrite) added and the conflicting ones
removed. `cli.main` and `pipeline` record each verb's own argv in `args.argv` (and its name in `args.verb`) for this.
"""

from __future__ import annotations

import shlex


def command(args, add: tuple[str, ...] = (), drop: dict[str, int] | None = None) -> str:
    """`nexus ARGV` with the flags of `drop` ({flag: number of values it takes}) removed and `add` appended.

    `add` is appended only when its first token is not already on the command line.
    """
    argv = list(getattr(args, "argv", None) or [getattr(args, "verb", "VERB")])
    drop = dict(drop or {})
    out, skip = [], 0
    for token in argv:
        if skip:
            skip -= 1
            continue
        name = token.split("=", 1)[0]
        if name in drop:
            skip = 0 if "=" in token else drop[name]
            continue
        out.append(token)
    if add and add[0] not in {t.split("=", 1)[0] for t in out}:
        out += list(add)
    return "nexus " + shlex.join(out)


def nothing_written(args, output: str | None = None) -> str:
    """Ctrl-C message of a verb whose output (default --output) appears only once complete (atomic write)."""
    output = args.output if output is None else output
    return (f"nothing was written to {output} (it appears only once complete); start again with: "
            f"{command(args)}")
