"""Progress of long work: tqdm bars on rank 0, and the units of the one-line summaries.

Every stage that runs for long shows the same bar (`bar`): tqdm on stderr, redrawn at most once a
second, shown only by rank 0 of a torchrun job. On a terminal it redraws in place; into a file or
pipe tqdm writes the same lines one after another, so a log still shows rate and ETA.
"""

from __future__ import annotations

import math

MIN_INTERVAL_S = 1.0  # at most one redraw per second: cheap in logs, still live on a terminal


def bar(total: float | None, desc: str, unit: str, initial: float = 0, unit_scale: bool = True,
        enabled: bool | None = None):
    """A tqdm progress bar (close it, or use it as a context manager). `enabled` defaults to rank 0 only."""
    from tqdm.auto import tqdm

    if enabled is None:
        from . import dist

        enabled = dist.is_main()
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, unit_scale=unit_scale, disable=not enabled,
                mininterval=MIN_INTERVAL_S, dynamic_ncols=True)


def format_eta(seconds: float) -> str:
    """Seconds as H:MM:SS; "?" when unknown (infinite or NaN)."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def format_bytes(n: float) -> str:
    """Bytes in binary units: 512 B, 1.5 KiB, 389.0 GiB."""
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            return f"{n:,.1f} {unit}"
    raise AssertionError("unreachable")


def rate(x: float) -> str:
    """A throughput for a console line: whole numbers from 10 up, else 2 significant digits (0.09, not 0)."""
    return f"{x:,.0f}" if x >= 10 else f"{x:.2g}"
