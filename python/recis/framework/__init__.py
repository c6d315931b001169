"""Training framework: Trainer, TrainingArguments, checkpoints."""

from recis.framework.checkpoint import CheckpointError, CheckpointManager, inspect_checkpoint
from recis.framework.trainer import Trainer, TrainingArguments, TrainingError

__all__ = [
    "CheckpointError",
    "CheckpointManager",
    "Trainer",
    "TrainingArguments",
    "TrainingError",
    "inspect_checkpoint",
]
