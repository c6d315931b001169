"""Evaluation metrics for CTR models: exact AUC (whole arrays or streaming),
group AUC, log loss, calibration."""

from recis.metrics.auc import auc, log_loss
from recis.metrics.streaming import AUROC, GAUC, Calibration, LogLoss

__all__ = ["AUROC", "GAUC", "Calibration", "LogLoss", "auc", "log_loss"]
