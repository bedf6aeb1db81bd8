"""User-facing errors.

A `NexusError` is a problem with what the user asked for (a path, a flag, a file): the CLI prints
its message without a traceback and exits non-zero. Anything else is a bug and keeps its traceback.
"""


class NexusError(Exception):
    """An error the user can fix; the message names the file or flag and what was expected."""
