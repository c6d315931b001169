"""DCN-V2 (Wang et al., 2021): the sparse fields' embeddings and the dense
features, concatenated into ``x0``, go through cross layers
``x_{l+1} = x0 * (W_l x_l + b_l) + x_l`` (``W_l`` full or, with ``rank``,
low-rank ``U_l V_l^T``) and then an MLP ("stacked" structure)."""

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


class CrossLayer(nn.Module):
    def __init__(self, width: int, rank: int | None = None):
        super().__init__()
        if rank is None:
            self.w = nn.Linear(width, width)
        else:
            self.w = nn.Sequential(nn.Linear(width, rank, bias=False), nn.Linear(rank, width))

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x0 * self.w(x) + x


@zoo_model("dcnv2")
class DCNv2(nn.Module):
    def __init__(
        self,
        sparse_fields,
        num_dense: int = 0,
        dim: int = 16,
        cross_layers: int = 3,
        rank: int | None = None,
        hidden: tuple[int, ...] = (400, 400),
        seed: int = 0,
        coalesce: bool = True,
        dropout: float = 0.0,
        batch_norm: bool = False,
        vectors=(),
    ):
        super().__init__()
        check_regularization(dropout, batch_norm, "DCNv2")
        vectors = check_vectors(vectors, "DCNv2")
        self.sparse_fields, self.embedding, self.project = sparse_engine(sparse_fields, dim, seed, coalesce)
        self.num_dense, self.dim = num_dense, dim
        width = dim * (len(self.sparse_fields) + len(vectors)) + num_dense
        self.cross = nn.ModuleList(CrossLayer(width, rank) for _ in range(cross_layers))
        self.deep, _ = mlp(width, hidden, dropout=dropout, batch_norm=batch_norm)
        self.vectors = VectorFields(vectors, dim) if vectors else None

    def tables(self):
        return self.embedding.tables()

    def forward(self, batch: dict) -> torch.Tensor:
        pooled = self.project(self.embedding({f: batch[f] for f in self.sparse_fields}))
        parts = [pooled[f] for f in self.sparse_fields]
        if self.vectors is not None:
            parts.append(self.vectors(batch, parts[0].dtype).flatten(1))
        dense = dense_input(batch, self.num_dense)
        if dense is not None:
            parts.append(dense)
        x0 = torch.cat(parts, dim=1)
        x = x0
        for layer in self.cross:
            x = layer(x0, x)
        return self.deep(x).squeeze(1)
