"""Sparse optimizers for hash tables (torch ``Optimizer`` subclasses)."""

from recis.optim.sparse import (
    SparseAdagrad,
    SparseAdam,
    SparseAdamW,
    SparseOptimizer,
    SparseRowWiseAdagrad,
    SparseSGD,
)

__all__ = [
    "SparseAdagrad",
    "SparseAdam",
    "SparseAdamW",
    "SparseOptimizer",
    "SparseRowWiseAdagrad",
    "SparseSGD",
]
