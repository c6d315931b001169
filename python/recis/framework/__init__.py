"""Training framework: Trainer, TrainingArguments, checkpoints."""

from recis.framework.checkpoint import CheckpointError, CheckpointManager, inspect_checkpoint
from recis.framework.trainer import Trainer, TrainingArguments, TrainingError, evaluate_model

__all__ = [
    "CheckpointError",
    "CheckpointManager",
    "Trainer",
    "TrainingArguments",
    "TrainingError",
    "evaluate_model",
    "inspect_checkpoint",
]
