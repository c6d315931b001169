"""DeepFM (Guo et al., 2017) on dynamic embeddings: a first-order term, the
factorization-machine second-order term over the sparse fields' embeddings,
and an MLP over the embeddings and dense features, summed into one logit.

Each sparse field has its own dynamic table (the same id in two fields is
two rows) whose rows hold an id's embedding (``dim`` values) and its
first-order weight (one more value); an ``EmbeddingEngine`` looks every field
up in one coalesced pass.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from recis.nn import EmbeddingEngine, EmbeddingOption, NormalInit


class DeepFM(nn.Module):
    def __init__(
        self,
        sparse_fields: list[str],
        num_dense: int = 0,
        dim: int = 16,
        hidden: tuple[int, ...] = (400, 400, 400),
        option: EmbeddingOption | None = None,
        seed: int = 0,
    ):
        super().__init__()
        if not sparse_fields:
            raise ValueError("DeepFM: needs at least one sparse field")
        self.sparse_fields = list(sparse_fields)
        self.num_dense = num_dense
        option = option or EmbeddingOption(dim=dim + 1, initializer=NormalInit(0.0, 0.01), seed=seed)
        if option.dim != dim + 1:
            raise ValueError(f"DeepFM: option.dim must be dim + 1 = {dim + 1} (embedding + first-order weight)")
        self.dim = dim
        # One table per field, seeded apart so that equal ids of two fields
        # start from different rows.
        self.embedding = EmbeddingEngine(
            {f: replace(option, seed=(option.seed + i) % 2**64) for i, f in enumerate(self.sparse_fields)}
        )
        self.dense_linear = nn.Linear(num_dense, 1) if num_dense else None
        layers, width = [], dim * len(self.sparse_fields) + num_dense
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)

    def tables(self):
        return self.embedding.tables()

    def forward(self, batch: dict) -> torch.Tensor:
        """Logits [B] of a batch holding the sparse fields (RaggedTensor or
        [B, L] ids) and, with ``num_dense``, a ``"dense"`` [B, num_dense] float tensor."""
        return self.logits(self.lookup(batch), batch)

    def lookup(self, batch: dict) -> torch.Tensor:
        """The sparse part: pooled rows of every field, [B, F, dim + 1]."""
        pooled = self.embedding({f: batch[f] for f in self.sparse_fields})
        return torch.stack([pooled[f] for f in self.sparse_fields], dim=1)

    def logits(self, rows: torch.Tensor, batch: dict) -> torch.Tensor:
        """The dense part: first-order, FM and MLP terms from ``lookup``'s rows."""
        v, first = rows[..., : self.dim], rows[..., self.dim]
        logit = first.sum(dim=1)
        logit = logit + 0.5 * (v.sum(1).pow(2) - v.pow(2).sum(1)).sum(1)
        deep_in = v.flatten(1)
        if self.num_dense:
            dense = batch["dense"].to(deep_in.dtype)
            logit = logit + self.dense_linear(dense).squeeze(1)
            deep_in = torch.cat([deep_in, dense], dim=1)
        return logit + self.mlp(deep_in).squeeze(1)
