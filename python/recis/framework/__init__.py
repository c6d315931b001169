"""Training framework: Trainer, TrainingArguments, checkpoints."""

from recis.framework.checkpoint import CheckpointError, CheckpointManager
from recis.framework.trainer import Trainer, TrainingArguments, TrainingError

__all__ = ["CheckpointError", "CheckpointManager", "Trainer", "TrainingArguments", "TrainingError"]
