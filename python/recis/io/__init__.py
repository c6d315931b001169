"""Reading training data: ORC files to batches, with an exact resumable cursor."""

from recis.io.dataset import Column, OrcDataset

__all__ = ["Column", "OrcDataset"]
