"""Linear assignment (the Hungarian problem): which column each row gets, at minimum total cost.

SciPy's `linear_sum_assignment` solves it (0.71 s for a 2880 × 2880 gpt-oss unit-similarity matrix in
benchmarks/bench_convert.py); this module checks the input and names the error.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment


def linear_assignment(cost: np.ndarray) -> np.ndarray:
    """Square cost [n, n] -> col [n]: row i is assigned column col[i], minimizing Σ cost[i, col[i]]."""
    cost = np.asarray(cost, dtype=np.float64)
    if cost.ndim != 2 or cost.shape[0] != cost.shape[1]:
        raise ValueError(f"linear_assignment needs a square matrix, got shape {cost.shape}")
    if not np.isfinite(cost).all():
        raise ValueError("linear_assignment: cost matrix has NaN or Inf entries")
    return linear_sum_assignment(cost)[1]
