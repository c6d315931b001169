"""Training framework: checkpoints (the Trainer and hooks are to come)."""

from recis.framework.checkpoint import CheckpointError, CheckpointManager

__all__ = ["CheckpointError", "CheckpointManager"]
