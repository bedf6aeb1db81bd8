"""--general-eval-dataset: which adapter a run that must keep general text within a limit ships.

Every evaluation reports the student's CE on the general set and its change against the frozen
base's there, in percent. `best/` holds the adapter with the lowest `eval_ce` among evaluations
whose change is strictly under `--max-general-increase` (ties keep the earlier step); the step-0
evaluation, the initialization itself, is a candidate too. Every rank runs the same selection on
the same (all-reduced) evaluation, so all agree on when best/ is written.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import NexusError
from ..fsutil import read_json
from . import checkpoint as ckpt

log = logging.getLogger("nexus.train")
BEST = "best"
FLAGS = {"max_general_increase": "--max-general-increase", "eval_data_fingerprint": "--eval-dataset",
         "general_data_fingerprint": "--general-eval-dataset"}


class GeneralSelection:
    """The best-so-far record of a run's output directory `out`.

    `key` ties a best/ to what it was selected with (the limit and both eval sets' fingerprints): a
    resumed run with another key is refused rather than comparing incomparable losses.
    """

    def __init__(self, out: Path, key: dict, base_ce: float):
        assert set(key) == set(FLAGS), key
        self.out, self.key, self.base_ce = Path(out), key, base_ce
        self.limit = key["max_general_increase"]
        self.best: dict | None = None

    def change(self, general_ce: float) -> float:
        """The general CE's change against the base's, in percent."""
        return 100 * (general_ce / self.base_ce - 1)

    def resume(self, resumed: dict | None, step: int, rank: int) -> None:
        """Take best/ from an earlier part of this run as the incumbent. `resumed`: the `selection` record of
        the checkpoint resumed from (None at a fresh start or when it had none)."""
        self.best = read_best(self.out, self.key)
        if rank == 0 and self.best is None and resumed is not None:
            log.warning(f"warning: --resume-from-checkpoint: the run's best/ (step {resumed['step']}) is not in "
                        f"{self.out}; the selection goes on from step {step} without it (copy best/ beside the "
                        f"checkpoint to keep it a candidate)")

    def consider(self, row: dict) -> bool:
        """Whether the adapter evaluated in `row` becomes best/: under the limit, and the lowest eval_ce so far."""
        if row["eval_general_change"] >= self.limit:
            return False
        if self.best is not None and row["eval_ce"] >= self.best["eval_ce"]:
            return False
        self.best = {"step": row["step"], "eval_ce": row["eval_ce"], "eval_general_ce": row["eval_general_ce"],
                     "eval_general_change": row["eval_general_change"], "general_base_ce": self.base_ce, **self.key}
        return True

    def summary(self) -> None:
        """The run's outcome, in the log (rank 0 calls it)."""
        if self.best is None:
            log.warning(f"warning: no evaluation had a general change under --max-general-increase {self.limit:g} %: "
                        f"no best/ was written (each evaluation's eval_general_change is in metrics.jsonl)")
        else:
            b = self.best
            log.info(f"best/: step {b['step']}, eval_ce {b['eval_ce']:.4f}, general change "
                     f"{b['eval_general_change']:+.2f} % (limit {self.limit:g} %)")


def read_best(out: Path, key: dict) -> dict | None:
    """The selection record of `out`/best/, checked against `key`; None when there is no best/."""
    path = Path(out) / BEST / ckpt.STATE
    if not path.is_file():
        return None
    state = read_json(path, "trainer state")
    sel = state.get("selection") if isinstance(state, dict) else None
    if not isinstance(sel, dict) or not {"step", "eval_ce", "eval_general_change"} <= set(sel):
        raise NexusError(f"{path}: not a best/ written by `nexus train --general-eval-dataset` (no selection "
                         f"record); move it away, or choose another --output-dir")
    for name, value in key.items():
        if sel.get(name) != value:
            raise NexusError(f"--resume-from-checkpoint: {path.parent} was selected with another {FLAGS[name]} "
                             f"than this run's; resume with the same, or move best/ away to start the selection "
                             f"over")
    return sel
