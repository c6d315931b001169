"""Streaming evaluation metrics: feed batches with ``update``, read with
``compute``. Exact, not approximate: AUC and GAUC keep the (score, label[,
group]) triples seen (12–20 bytes a sample) and rank them at ``compute``;
log loss and calibration keep running sums.

``state_dict``/``load_state_dict`` carry the accumulated values as tensors
(safetensors-friendly), so an evaluation can be checkpointed mid-way.
"""

from __future__ import annotations

import numpy as np
import torch

from recis import distributed
from recis.metrics.auc import auc


def _np(x, dtype) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype).ravel()


class _Collect:
    def __init__(self):
        self._labels: list[np.ndarray] = []
        self._scores: list[np.ndarray] = []

    def _add(self, labels, scores):
        y, s = _np(labels, np.float64), _np(scores, np.float64)
        if y.shape != s.shape:
            raise ValueError(f"{type(self).__name__}: labels has {y.size} values, scores has {s.size}")
        if not np.isin(y, (0.0, 1.0)).all():
            bad = y[~np.isin(y, (0.0, 1.0))][0]
            raise ValueError(f"{type(self).__name__}: labels must be 0 or 1, got {bad}")
        if not np.isfinite(s).all():
            raise ValueError(f"{type(self).__name__}: scores must be finite")
        self._labels.append(y)
        self._scores.append(s)

    def _arrays(self):
        if not self._labels:
            return np.zeros(0), np.zeros(0)
        return np.concatenate(self._labels), np.concatenate(self._scores)

    def reset(self) -> None:
        self._labels.clear()
        self._scores.clear()

    def sync(self) -> None:
        """Under torchrun: every rank's samples on every rank (a no-op in
        one process). Collective: every rank must call it."""
        if not distributed.active():
            return
        y, s = distributed.gather_arrays(list(self._arrays()))
        self._labels[:], self._scores[:] = [y], [s]


class AUROC(_Collect):
    """Exact area under the ROC curve of every sample seen (ties count one
    half, as ``sklearn.metrics.roc_auc_score``)."""

    def update(self, labels, scores) -> None:
        self._add(labels, scores)

    def compute(self) -> float:
        y, s = self._arrays()
        return auc(y, s)

    def state_dict(self) -> dict[str, torch.Tensor]:
        y, s = self._arrays()
        return {"labels": torch.from_numpy(y), "scores": torch.from_numpy(s)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.reset()
        self._add(state["labels"], state["scores"])


class GAUC(_Collect):
    """Group AUC: the AUC within each group (e.g. user), averaged with each
    group weighted by its number of samples. Groups whose labels are all
    equal have no AUC and are skipped (as in DeepRec and the original RecIS)."""

    def __init__(self):
        super().__init__()
        self._groups: list[np.ndarray] = []

    def update(self, labels, scores, groups) -> None:
        g = _np(groups, np.int64)
        if g.size != _np(labels, np.float64).size:
            raise ValueError(f"GAUC: groups has {g.size} values, labels has {_np(labels, np.float64).size}")
        self._add(labels, scores)
        self._groups.append(g)

    def reset(self) -> None:
        super().reset()
        self._groups.clear()

    def sync(self) -> None:
        if not distributed.active():
            return
        g = np.concatenate(self._groups) if self._groups else np.zeros(0, dtype=np.int64)
        y, s, g = distributed.gather_arrays([*self._arrays(), g])
        self._labels[:], self._scores[:], self._groups[:] = [y], [s], [g]

    def compute(self) -> float:
        y, s = self._arrays()
        if y.size == 0:
            raise ValueError("GAUC: no samples")
        g = np.concatenate(self._groups)
        order = np.argsort(g, kind="stable")
        g, y, s = g[order], y[order], s[order]
        bounds = np.flatnonzero(np.diff(g)) + 1
        total, weight = 0.0, 0
        for ys, ss in zip(np.split(y, bounds), np.split(s, bounds), strict=True):
            pos = ys.sum()
            if 0 < pos < ys.size:
                total += auc(ys, ss) * ys.size
                weight += ys.size
        if weight == 0:
            raise ValueError("GAUC: no group has both a positive and a negative label")
        return total / weight


class LogLoss:
    """Mean binary cross-entropy of probabilities (clipped to [eps, 1 - eps])."""

    def __init__(self, eps: float = 1e-7):
        self.eps = eps
        self.total = 0.0
        self.count = 0

    def update(self, labels, probs) -> None:
        y = _np(labels, np.float64)
        p = np.clip(_np(probs, np.float64), self.eps, 1 - self.eps)
        self.total += float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).sum())
        self.count += y.size

    def compute(self) -> float:
        return self.total / max(self.count, 1)

    def sync(self) -> None:
        """Under torchrun: the sums of every rank (collective)."""
        self.total, count = distributed.sum_floats([self.total, self.count])
        self.count = int(count)


class Calibration:
    """Mean predicted probability over the observed click rate (1.0 is
    calibrated)."""

    def __init__(self):
        self.pred = 0.0
        self.clicks = 0.0
        self.count = 0

    def update(self, labels, probs) -> None:
        self.pred += float(_np(probs, np.float64).sum())
        self.clicks += float(_np(labels, np.float64).sum())
        self.count += _np(labels, np.float64).size

    def sync(self) -> None:
        """Under torchrun: the sums of every rank (collective)."""
        self.pred, self.clicks, count = distributed.sum_floats([self.pred, self.clicks, self.count])
        self.count = int(count)

    def compute(self) -> float:
        if self.clicks == 0:
            raise ValueError("Calibration: no positive label seen")
        return self.pred / self.clicks
