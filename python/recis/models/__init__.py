"""Model zoo: plain nn.Modules around dynamic embeddings."""

from recis.models.deepfm import DeepFM

__all__ = ["DeepFM"]
