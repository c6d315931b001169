"""DLRM (Naumov et al., 2019): a bottom MLP maps the dense features to the
embedding width; the pairwise dot products of that vector and every sparse
field's pooled embedding, with the vector itself, feed a top MLP."""

from __future__ import annotations

import torch
from torch import nn

from recis.models.common import (
    VectorFields,
    check_regularization,
    check_vectors,
    dense_input,
    mlp,
    sparse_engine,
    zoo_model,
)


@zoo_model("dlrm")
class DLRM(nn.Module):
    def __init__(
        self,
        sparse_fields,
        num_dense: int,
        dim: int = 16,
        bottom: tuple[int, ...] = (512, 256),
        top: tuple[int, ...] = (512, 256),
        seed: int = 0,
        coalesce: bool = True,
        dropout: float = 0.0,
        batch_norm: bool = False,
        vectors=(),
    ):
        super().__init__()
        check_regularization(dropout, batch_norm, "DLRM")
        vectors = check_vectors(vectors, "DLRM")
        if num_dense < 1:
            raise ValueError("DLRM: needs dense features (num_dense >= 1) for its bottom MLP")
        self.sparse_fields, self.embedding, self.project = sparse_engine(sparse_fields, dim, seed, coalesce)
        self.num_dense, self.dim = num_dense, dim
        self.bottom, _ = mlp(num_dense, bottom, out=dim, dropout=dropout, batch_norm=batch_norm)
        self.bottom.append(nn.ReLU())
        n = len(self.sparse_fields) + 1 + len(vectors)
        self.vectors = VectorFields(vectors, dim) if vectors else None
        self.register_buffer("_pairs", torch.triu_indices(n, n, offset=1), persistent=False)
        self.top, _ = mlp(dim + n * (n - 1) // 2, top, dropout=dropout, batch_norm=batch_norm)

    def tables(self):
        return self.embedding.tables()

    def forward(self, batch: dict) -> torch.Tensor:
        """Logits [B]: the sparse fields (RaggedTensor or [B, L] ids) and
        ``"dense"`` [B, num_dense]."""
        pooled = self.project.stacked(self.embedding, batch, self.sparse_fields)  # [B, F, dim]
        x = self.bottom(dense_input(batch, self.num_dense))
        parts = [x.unsqueeze(1), pooled]
        if self.vectors is not None:
            parts.append(self.vectors(batch, pooled.dtype))
        t = torch.cat(parts, dim=1)  # [B, n, dim]
        dots = torch.bmm(t, t.transpose(1, 2))[:, self._pairs[0], self._pairs[1]]
        return self.top(torch.cat([x, dots], dim=1)).squeeze(1)
