"""Linear assignment (the Hungarian problem) in numpy: which column each row gets, at minimum total cost.

Shortest augmenting paths with dual variables (Jonker-Volgenant style, as in Crouse, "On implementing
2D rectangular assignment algorithms", 2016): rows are added one at a time; each addition runs a
Dijkstra search over columns on reduced costs, vectorized over the columns, then flips the
assignment along the path found. O(n^3) in the worst case, with numpy doing the inner loop.
"""

from __future__ import annotations

import numpy as np


def linear_assignment(cost: np.ndarray) -> np.ndarray:
    """Square cost [n, n] -> col [n]: row i is assigned column col[i], minimizing Σ cost[i, col[i]]."""
    cost = np.asarray(cost, dtype=np.float64)
    if cost.ndim != 2 or cost.shape[0] != cost.shape[1]:
        raise ValueError(f"linear_assignment needs a square matrix, got shape {cost.shape}")
    if not np.isfinite(cost).all():
        raise ValueError("linear_assignment: cost matrix has NaN or Inf entries")
    n = cost.shape[0]
    u = np.zeros(n)  # row duals
    v = np.zeros(n)  # column duals
    col4row = np.full(n, -1)
    row4col = np.full(n, -1)
    for cur in range(n):
        shortest = np.full(n, np.inf)  # reduced path cost to reach each column
        path = np.full(n, -1)  # the row each column was reached from
        scanned_col = np.zeros(n, dtype=bool)
        scanned_rows = []
        i, min_val, sink = cur, 0.0, -1
        while sink < 0:
            scanned_rows.append(i)
            reduced = min_val + cost[i] - u[i] - v  # [n]
            better = ~scanned_col & (reduced < shortest)
            path[better] = i
            shortest[better] = reduced[better]
            candidates = np.where(scanned_col, np.inf, shortest)
            j = int(np.argmin(candidates))
            min_val = candidates[j]
            # among ties, an unassigned column ends the search now
            ties = np.flatnonzero((candidates == min_val) & (row4col < 0))
            if ties.size:
                j = int(ties[0])
            scanned_col[j] = True
            if row4col[j] < 0:
                sink = j
            else:
                i = row4col[j]
        # dual update keeps reduced costs non-negative and zero on assigned pairs
        u[cur] += min_val
        others = np.asarray(scanned_rows[1:], dtype=np.int64)
        if others.size:
            u[others] += min_val - shortest[col4row[others]]
        v[scanned_col] -= min_val - shortest[scanned_col]
        j = sink
        while True:  # augment along the path back to `cur`
            i = path[j]
            row4col[j] = i
            col4row[i], j = j, col4row[i]
            if i == cur:
                break
    return col4row
