"""Evaluation metrics for CTR models."""

from recis.metrics.auc import auc, log_loss

__all__ = ["auc", "log_loss"]
