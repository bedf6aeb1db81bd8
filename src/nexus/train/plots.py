"""Figures of a training run's metrics: losses, LR and temperature, grad norm, router drift, throughput.

`plot_run` reads OUTPUT_DIR/metrics.jsonl (and run_config.json, for the planned LR / temperature
schedule over the whole run) and writes one PNG with five panels; `nexus plot-metrics` runs it.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import NexusError
from ..fsutil import atomic_path, read_json
from .metrics import read_metrics
from .schedule import Schedule

# (title, keys on the left axis, keys on the right axis: a different scale)
PANELS = (
    ("losses", ("loss", "ce", "eval_loss"), ("kl", "router_kl")),
    ("learning rate / temperature", ("lr",), ("temperature", "kl_weight")),
    ("gradient norm (before clipping)", ("grad_norm",), ()),
    ("router: L1 drift / entropy", ("router_l1",), ("router_entropy", "teacher_router_entropy")),
    ("throughput (tokens/s)", ("tokens_per_s",), ()),
)


def planned_schedule(run_config: dict) -> tuple[list[int], list[float], list[float]] | None:
    """(steps 1..max, lr, temperature) of the run's schedule, from run_config.json."""
    s = run_config.get("schedule")
    if not s:
        return None
    sched = Schedule(**s)
    steps = list(range(1, sched.max_steps + 1))
    return steps, [sched.lr(i - 1) for i in steps], [sched.temp(i - 1) for i in steps]


def _series(rows: list[dict], key: str) -> tuple[list, list]:
    pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    return (list(zip(*pts))) if pts else ([], [])


def metrics_figure(rows: list[dict], run_config: dict | None = None, title: str = ""):
    """The five-panel figure of a run's metrics (with the planned schedule when `run_config` is given)."""
    import matplotlib
    from matplotlib.figure import Figure  # no pyplot: no global figure state

    fig = Figure(figsize=(9, 2.8 * len(PANELS)))
    axes = fig.subplots(len(PANELS), 1, sharex=True)
    colors = iter(matplotlib.rcParams["axes.prop_cycle"].by_key()["color"] * 4)
    plan = planned_schedule(run_config) if run_config else None
    for ax, (name, left, right) in zip(axes, PANELS):
        twin = ax.twinx() if any(_series(rows, k)[0] for k in right) else None
        for target, keys in ((ax, left), (twin, right)):
            for key in keys:
                x, y = _series(rows, key)
                if x:
                    target.plot(x, y, "o" if key.startswith("eval_") else "-", label=key, markersize=3,
                                color=next(colors))
        if plan and name.startswith("learning"):
            ax.plot(plan[0], plan[1], ":", color="gray", label="planned lr")
            if twin is not None:
                twin.plot(plan[0], plan[2], ":", color="salmon", label="planned temperature")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        if twin is not None:
            h2, l2 = twin.get_legend_handles_labels()
            handles, labels = handles + h2, labels + [f"{lab} (right)" for lab in l2]
        if handles:
            ax.legend(handles, labels, fontsize=8, loc="best")
    axes[-1].set_xlabel("step")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_metrics(rows: list[dict], path: Path, run_config: dict | None = None, title: str = "") -> Path:
    fig = metrics_figure(rows, run_config, title)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return path


def plot_run(output_dir: str | Path, path: str | Path | None = None, title: str | None = None) -> tuple[Path, int]:
    """Plot a `nexus train` output directory (metrics.jsonl, and run_config.json's planned schedule);
    returns the PNG written (default OUTPUT_DIR/plots/metrics.png) and the number of rows."""
    out = Path(output_dir)
    rows = read_metrics(out / "metrics.jsonl")
    if not rows:
        raise NexusError(f"{out}: no metrics.jsonl with rows (is it a `nexus train` --output-dir?)")
    run_config = read_json(out / "run_config.json", "run config") if (out / "run_config.json").is_file() else None
    path = Path(path) if path else out / "plots" / "metrics.png"
    return plot_metrics(rows, path, run_config, title=str(out) if title is None else title), len(rows)
