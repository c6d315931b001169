"""Sparse optimizers for hash tables (torch ``Optimizer`` subclasses)."""

from recis.optim.sparse import (
    SparseAdagrad,
    SparseAdam,
    SparseAdamW,
    SparseOptimizer,
    SparseRowWiseAdagrad,
    SparseSGD,
)
from recis.optim.training import Schedulers, clip_grad_norm_, warmup_schedule

__all__ = [
    "SparseAdagrad",
    "SparseAdam",
    "SparseAdamW",
    "SparseOptimizer",
    "SparseRowWiseAdagrad",
    "SparseSGD",
    "Schedulers",
    "clip_grad_norm_",
    "warmup_schedule",
]
