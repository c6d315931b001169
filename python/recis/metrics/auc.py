"""Exact AUC (ties count one half) and log loss over whole arrays."""

from __future__ import annotations

import numpy as np


def auc(labels, scores) -> float:
    """Area under the ROC curve by the rank-sum formula; tied scores share
    their mean rank, as ``sklearn.metrics.roc_auc_score`` counts them."""
    y = np.asarray(labels, dtype=np.float64).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"auc: labels has {y.size} values, scores has {s.size}")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("auc: labels must be 0 or 1")
    pos = int(y.sum())
    neg = y.size - pos
    if pos == 0 or neg == 0:
        raise ValueError("auc: needs at least one positive and one negative label")
    order = np.argsort(s, kind="mergesort")
    s_sorted = s[order]
    ranks = np.empty(y.size, dtype=np.float64)
    # Mean rank (1-based) of each run of tied scores.
    boundaries = np.flatnonzero(np.diff(s_sorted)) + 1
    starts = np.concatenate(([0], boundaries))
    ends = np.concatenate((boundaries, [y.size]))
    mean_rank = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return float((ranks[y == 1].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


def log_loss(labels, probs, eps: float = 1e-7) -> float:
    y = np.asarray(labels, dtype=np.float64).ravel()
    p = np.clip(np.asarray(probs, dtype=np.float64).ravel(), eps, 1 - eps)
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())
