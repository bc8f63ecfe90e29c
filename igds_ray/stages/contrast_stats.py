"""The statistics of contrastive latents: AUROC with tied ranks, its stratified bootstrap CI, answer
labels from a task metric, a seeded stratified split. Pure numpy, no I/O."""

from __future__ import annotations

import numpy as np

# Columns ranked at once: bounds the rank arrays to n x 4096 values whatever the SAE's width.
_COLUMN_BLOCK = 4096


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks down each column of x [n, m] (or of a vector); tied values share their average rank."""
    a = np.asarray(x, np.float64)
    vec = a.ndim == 1
    if vec:
        a = a[:, None]
    n, m = a.shape
    order = np.argsort(a, axis=0, kind="stable")
    sorted_ = np.take_along_axis(a, order, 0)
    starts = np.ones((n, m), bool)
    starts[1:] = sorted_[1:] != sorted_[:-1]
    # One id per (column, run of equal values), unique across columns, so one bincount serves all.
    group = np.cumsum(starts, axis=0) - 1 + np.arange(m)[None, :] * n
    pos = np.broadcast_to(np.arange(1, n + 1, dtype=np.float64)[:, None], (n, m))
    sums = np.bincount(group.ravel(), weights=pos.ravel(), minlength=n * m)
    counts = np.bincount(group.ravel(), minlength=n * m)
    ranks = np.empty((n, m))
    np.put_along_axis(ranks, order, sums[group] / counts[group], 0)
    return ranks[:, 0] if vec else ranks


def auroc(scores: np.ndarray, positive: np.ndarray) -> np.ndarray | float:
    """Area under the ROC curve of `scores` [n] or [n, m] (per column) for the `positive` class [n]:
    the Mann-Whitney U over n_pos x n_neg, i.e. P(score of a positive > score of a negative) with ties
    counted one half. 1.0: every positive scores above every negative."""
    s = np.asarray(scores, np.float64)
    y = np.asarray(positive, bool)
    vec = s.ndim == 1
    if vec:
        s = s[:, None]
    if s.shape[0] != y.shape[0]:
        raise ValueError(f"auroc: {s.shape[0]} scores but {y.shape[0]} labels")
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"auroc needs both classes; got {n_pos} positive and {n_neg} negative")
    out = np.empty(s.shape[1])
    for c in range(0, s.shape[1], _COLUMN_BLOCK):
        r = average_ranks(s[:, c : c + _COLUMN_BLOCK])
        out[c : c + _COLUMN_BLOCK] = (r[y].sum(0) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return float(out[0]) if vec else out


def bootstrap_auroc_ci(scores: np.ndarray, positive: np.ndarray, n_boot: int, level: float,
                       rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Percentile CI of each column's AUROC [m]: positives and negatives are resampled separately
    (stratified, as pROC does), so every resample keeps both classes at their observed sizes."""
    s = np.asarray(scores, np.float64)
    y = np.asarray(positive, bool)
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    labels = np.r_[np.ones(len(pos), bool), np.zeros(len(neg), bool)]
    stats = np.empty((n_boot, s.shape[1]))
    for b in range(n_boot):
        idx = np.r_[rng.choice(pos, len(pos)), rng.choice(neg, len(neg))]
        stats[b] = auroc(s[idx], labels)
    tail = (1.0 - level) / 2
    return np.quantile(stats, tail, axis=0), np.quantile(stats, 1.0 - tail, axis=0)


def label_answers(scores: np.ndarray) -> tuple[np.ndarray, str]:
    """(correct [n] bool, the rule in words) from per-answer task scores in [0, 1]: a 0/1 metric labels
    by the score; any other by the median (ties at the median count as incorrect)."""
    s = np.asarray(scores, np.float64)
    if s.size == 0:
        return np.zeros(0, bool), "no answers"
    if np.all((s == 0.0) | (s == 1.0)):
        return s == 1.0, "0/1 metric: correct when the task score is 1"
    med = float(np.median(s))
    return s > med, f"continuous metric: correct when the task score is above the median {med:.6g}, else incorrect"


def split_halves(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of halves A and B (each sorted): every label's examples are shuffled (seeded) and split
    in two, A taking the extra one of an odd count, so both halves hold both labels."""
    y = np.asarray(labels)
    rng = np.random.default_rng([seed, 1])
    a, b = [], []
    for value in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == value))
        half = (len(idx) + 1) // 2
        a.append(idx[:half])
        b.append(idx[half:])
    return np.sort(np.concatenate(a)), np.sort(np.concatenate(b))
