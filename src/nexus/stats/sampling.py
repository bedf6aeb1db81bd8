"""Greedy selection of a representative subset of candidate documents (pure numpy, no I/O).

Candidates are token-id arrays. The pool is stored once as a sparse count matrix over its own
compact vocabulary (only ids that occur), so memory and time scale with the pool's tokens, not
with the tokenizer's vocabulary size.

Two objectives, both greedy (each step adds the candidate that most improves the objective; ties
go to the lowest candidate index), both stopping once the selection holds `target_tokens`:

- `coverage`: the most token ids not yet covered. Coverage is submodular, so a candidate's gain
  can only shrink; a lazy heap re-evaluates only candidates whose stale gain could still win.
- `distribution`: the lowest KL(selected unigram || pool unigram). With counts c (selection so far,
  N tokens), pool probabilities p and F(c) = sum_v c_v log(c_v / p_v), KL = F(c) / N - log N, and
  adding candidate i (counts a_i, n_i tokens) changes F by
      delta_i = sum_{v in i} [xlogx(c_v + a_iv) - xlogx(c_v)] - sum_{v in i} a_iv log p_v,
  a sum over i's own distinct tokens. xlogx(c + a) - xlogx(c) grows with c, and c only grows, so a
  delta computed earlier is a lower bound of the current one: (F + stale delta_i) / (N + n_i) -
  log(N + n_i) bounds candidate i's KL from below. Each step recomputes exactly only the
  candidates whose bound could beat the best exact value (lazy greedy with exact results).

Values within `RTOL` (relative) of the best count as ties, so the greedy result does not hinge on
the last bit of a floating-point sum; the naive reference in the tests uses the same rule.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

OBJECTIVES = ("distribution", "coverage")
RTOL = 1e-12  # relative tolerance under which two KL values are a tie (lowest index wins)
_REFRESH_CHUNK = 64  # stale candidates re-evaluated per round, smallest bound first


@dataclass
class Pool:
    """Candidates as a sparse (C, U) count matrix over the pool's compact vocabulary of U ids."""

    indptr: np.ndarray  # (C + 1,) int64 row starts
    cols: np.ndarray  # (nnz,) int64 compact token ids, ascending within each row
    counts: np.ndarray  # (nnz,) int64 occurrences of that id in that candidate
    lengths: np.ndarray  # (C,) int64 tokens per candidate
    vocab: np.ndarray  # (U,) original token ids
    pool_counts: np.ndarray  # (U,) int64 occurrences in the whole pool

    @property
    def num_candidates(self) -> int:
        return len(self.lengths)

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())


@dataclass
class Selection:
    order: list[int]  # candidate indices, in the order they were picked
    tokens: int  # tokens in the selection
    coverage: float  # distinct token ids in the selection / distinct ids in the pool
    kl: float  # KL(selected unigram || pool unigram), nats


def build_pool(token_lists: list) -> Pool:
    """Pool of candidates (each a sequence of token ids, at least one token)."""
    lengths = np.array([len(t) for t in token_lists], dtype=np.int64)  # (C,)
    if len(lengths) == 0 or (lengths == 0).any():
        raise ValueError("every candidate needs at least one token")
    flat = np.concatenate([np.asarray(t, dtype=np.int64) for t in token_lists])  # (T,)
    if flat.min() < 0:
        raise ValueError("token ids must be non-negative")
    # Compact vocabulary through a dense lookup (token ids are bounded by the tokenizer's vocab).
    pool_counts = np.bincount(flat)  # (max_id + 1,)
    vocab = np.flatnonzero(pool_counts)  # (U,)
    to_compact = np.zeros(len(pool_counts), dtype=np.int64)
    to_compact[vocab] = np.arange(len(vocab))
    rows = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)  # (T,)
    keys = np.sort(rows * len(vocab) + to_compact[flat], kind="stable")  # (T,) grouped by row, then id
    starts = np.flatnonzero(np.concatenate(([True], keys[1:] != keys[:-1])))  # (nnz,) first of each run
    counts = np.diff(np.append(starts, len(keys)))  # (nnz,)
    keys = keys[starts]
    indptr = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(np.bincount(keys // len(vocab), minlength=len(lengths)), out=indptr[1:])
    return Pool(indptr=indptr, cols=keys % len(vocab), counts=counts.astype(np.int64), lengths=lengths,
                vocab=vocab, pool_counts=pool_counts[vocab].astype(np.int64))


def kl_to_pool(pool: Pool, selected_counts: np.ndarray) -> float:
    """KL(selected unigram || pool unigram) in nats; `selected_counts` is (U,) over the compact vocab."""
    n = selected_counts.sum()
    if n == 0:
        return float("nan")
    q = selected_counts / n
    p = pool.pool_counts / pool.pool_counts.sum()
    nz = q > 0
    return float(np.sum(q[nz] * np.log(q[nz] / p[nz])))


def _summarize(pool: Pool, order: list[int]) -> Selection:
    counts = np.zeros(len(pool.vocab), dtype=np.int64)
    for i in order:
        lo, hi = pool.indptr[i], pool.indptr[i + 1]
        counts[pool.cols[lo:hi]] += pool.counts[lo:hi]
    coverage = float((counts > 0).sum() / len(pool.vocab))
    return Selection(order=order, tokens=int(pool.lengths[order].sum()) if order else 0,
                     coverage=coverage, kl=kl_to_pool(pool, counts))


def greedy_coverage(pool: Pool, target_tokens: int) -> list[int]:
    """Greedy max coverage of distinct token ids (lazy heap). Returns picked indices in order."""
    covered = np.zeros(len(pool.vocab), dtype=bool)  # (U,)
    # Heap entries (-gain bound, index): tuple order = larger gain first, then lower index.
    heap = [(-int(pool.indptr[i + 1] - pool.indptr[i]), i) for i in range(pool.num_candidates)]
    heapq.heapify(heap)
    order, total = [], 0
    while heap and total < target_tokens:
        _, i = heapq.heappop(heap)
        ids = pool.cols[pool.indptr[i]:pool.indptr[i + 1]]
        fresh = (-int((~covered[ids]).sum()), i)
        # Every other entry's bound is >= its true gain, so winning against the top bound is winning.
        if heap and fresh > heap[0]:
            heapq.heappush(heap, fresh)
            continue
        covered[ids] = True
        order.append(i)
        total += int(pool.lengths[i])
    return order


class _DistributionGreedy:
    """State of the lazy greedy KL minimisation (see the module docstring for the algebra)."""

    def __init__(self, pool: Pool):
        self.pool = pool
        # xlogx on integers, as a table: no count in a selection exceeds the pool's count.
        grid = np.arange(int(pool.pool_counts.max()) + 1, dtype=np.float64)
        self.xlogx = grid * np.log(np.maximum(grid, 1.0))  # (max_count + 1,), xlogx(0) = 0
        log_p = np.log(pool.pool_counts / pool.pool_counts.sum())  # (U,)
        self.row_of = np.repeat(np.arange(pool.num_candidates), np.diff(pool.indptr))  # (nnz,)
        # Constant part of every delta: -sum a_iv log p_v.                              (C,)
        self.const = -np.bincount(self.row_of, weights=pool.counts * log_p[pool.cols], minlength=pool.num_candidates)
        self.c = np.zeros(len(pool.vocab), dtype=np.int64)  # (U,) counts selected so far
        self.F = 0.0
        self.N = 0
        self.delta = self.const + np.bincount(self.row_of, weights=self.xlogx[pool.counts],
                                              minlength=pool.num_candidates)  # exact at c = 0
        self.remaining = np.ones(pool.num_candidates, dtype=bool)
        self.fresh = np.ones(pool.num_candidates, dtype=bool)  # delta exact for the current c

    def refresh(self, idx: np.ndarray) -> None:
        """Recompute delta exactly for candidates `idx` (vectorized over their nonzeros)."""
        pool = self.pool
        starts, ends = pool.indptr[idx], pool.indptr[idx + 1]
        sizes = ends - starts
        offsets = np.zeros(len(idx), dtype=np.int64)
        np.cumsum(sizes[:-1], out=offsets[1:])
        pos = np.arange(int(sizes.sum()), dtype=np.int64) + np.repeat(starts - offsets, sizes)  # nonzeros of idx
        c = self.c[pool.cols[pos]]
        gain = self.xlogx[c + pool.counts[pos]] - self.xlogx[c]
        self.delta[idx] = self.const[idx] + np.add.reduceat(gain, offsets)
        self.fresh[idx] = True

    def step(self) -> int:
        """Pick the next candidate: refresh stale candidates, smallest bound first, until no stale
        bound comes within the tie tolerance of the best exact value."""
        denom = self.N + self.pool.lengths  # (C,)
        log_denom = np.log(denom)
        vals = (self.F + self.delta) / denom - log_denom  # (C,) exact where fresh, else a lower bound
        vals[~self.remaining] = np.inf
        best = np.where(self.fresh, vals, np.inf).min()
        chunk = _REFRESH_CHUNK
        while True:
            stale = np.flatnonzero(self.remaining & ~self.fresh)
            if np.isfinite(best):
                stale = stale[vals[stale] <= best + RTOL * max(1.0, abs(best))]
            if len(stale) == 0:
                break
            if len(stale) > chunk:
                stale = stale[np.argpartition(vals[stale], chunk)[:chunk]]
            stale.sort()
            self.refresh(stale)
            vals[stale] = (self.F + self.delta[stale]) / denom[stale] - log_denom[stale]
            best = min(best, vals[stale].min())
            chunk *= 2  # bounds that survived a round are usually loose: take bigger bites
        exact = np.where(self.fresh, vals, np.inf)
        j = int(np.flatnonzero(exact <= best + RTOL * max(1.0, abs(best)))[0])  # lowest index among ties
        self.add(j)
        return j

    def add(self, j: int) -> None:
        pool = self.pool
        lo, hi = pool.indptr[j], pool.indptr[j + 1]
        self.F += self.delta[j]
        self.N += int(pool.lengths[j])
        self.c[pool.cols[lo:hi]] += pool.counts[lo:hi]
        self.remaining[j] = False
        self.fresh[:] = False


def greedy_distribution(pool: Pool, target_tokens: int) -> list[int]:
    """Greedy min KL(selected unigram || pool unigram). Returns picked indices in order."""
    state = _DistributionGreedy(pool)
    order: list[int] = []
    while state.N < target_tokens and state.remaining.any():
        order.append(state.step())
    return order


def select(pool: Pool, target_tokens: int, objective: str = "distribution") -> Selection:
    """Pick candidates greedily until they hold at least `target_tokens` tokens (or the pool is used up)."""
    if objective == "coverage":
        order = greedy_coverage(pool, target_tokens)
    elif objective == "distribution":
        order = greedy_distribution(pool, target_tokens)
    else:
        raise ValueError(f"unknown objective {objective!r} (expected one of {OBJECTIVES})")
    return _summarize(pool, order)
