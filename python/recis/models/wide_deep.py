"""Wide & Deep (Cheng et al., 2016): a wide linear model over the sparse ids
(a learned weight per id) and the dense features, plus a deep MLP over the
fields' embeddings and the dense features, summed into one logit.

Each field's table row holds the id's embedding (``dim`` values) and its
wide weight (one more), so one lookup serves both parts."""

from __future__ import annotations

import torch
from torch import nn

from recis.models.common import (
    FeatureRemap,
    VectorFields,
    check_regularization,
    check_vectors,
    dense_input,
    mlp,
    sparse_engine,
    zoo_model,
)


@zoo_model("wide_deep")
class WideDeep(FeatureRemap, nn.Module):
    _first_linear = "deep.0"  # the one layer that reads the features in order (remap_dense)
    extra_width = 1  # a table row: the embedding, then the first-order (wide) weight

    def __init__(
        self,
        sparse_fields,
        num_dense: int = 0,
        dim: int = 16,
        hidden: tuple[int, ...] = (400, 400, 400),
        seed: int = 0,
        coalesce: bool = True,
        dropout: float = 0.0,
        batch_norm: bool = False,
        vectors=(),
    ):
        super().__init__()
        check_regularization(dropout, batch_norm, "WideDeep")
        vectors = check_vectors(vectors, "WideDeep")
        self.sparse_fields, self.embedding, self.project = sparse_engine(sparse_fields, dim + 1, seed, coalesce)
        self.num_dense, self.dim = num_dense, dim
        self.wide_dense = nn.Linear(num_dense, 1) if num_dense else None
        fields = len(self.sparse_fields) + len(vectors)
        self.deep, _ = mlp(dim * fields + num_dense, hidden, dropout=dropout, batch_norm=batch_norm)
        self.vectors = VectorFields(vectors, dim + 1) if vectors else None  # projected: embedding + wide weight

    def tables(self):
        return self.embedding.tables()

    def forward(self, batch: dict) -> torch.Tensor:
        rows = self.project.stacked(self.embedding, batch, self.sparse_fields)  # [B, F, dim + 1]
        if self.vectors is not None:
            rows = torch.cat([rows, self.vectors(batch, rows.dtype)], 1)
        emb, wide = rows[..., : self.dim], rows[..., self.dim].sum(1)
        deep_in = emb.flatten(1)
        dense = dense_input(batch, self.num_dense, deep_in.dtype)
        if dense is not None:
            wide = wide + self.wide_dense(dense).squeeze(1)
            deep_in = torch.cat([deep_in, dense], dim=1)
        return wide + self.deep(deep_in).squeeze(1)
