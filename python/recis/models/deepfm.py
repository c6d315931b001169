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
from recis.nn import EmbeddingOption
from recis.nn.options import name_seed


@zoo_model("deepfm")
class DeepFM(FeatureRemap, nn.Module):
    _first_linear = "mlp.0"  # the one layer that reads the features in order (remap_dense)
    extra_width = 1  # a table row: the embedding, then the first-order (wide) weight

    def __init__(
        self,
        sparse_fields,
        num_dense: int = 0,
        dim: int = 16,
        hidden: tuple[int, ...] = (400, 400, 400),
        option: EmbeddingOption | None = None,
        seed: int = 0,
        coalesce: bool = True,
        dropout: float = 0.0,
        batch_norm: bool = False,
        vectors=(),
    ):
        """``sparse_fields``: names, or {name: EmbeddingOption} with
        ``dim + 1`` each; ``option``: one option for every named field
        (each seeded by its name: ``recis.nn.options.name_seed``);
        ``vectors``: [name, K] pairs of precomputed vector inputs
        (``VectorFields``), each projected to a field (its embedding and
        first-order weight) that joins the FM and the MLP."""
        super().__init__()
        check_regularization(dropout, batch_norm, "DeepFM")
        vectors = check_vectors(vectors, "DeepFM")
        if option is not None:
            if option.dim != dim + 1:
                raise ValueError(f"DeepFM: option.dim must be dim + 1 = {dim + 1} (embedding + first-order weight)")
            sparse_fields = {f: replace(option, seed=name_seed(option.seed, f)) for f in sparse_fields}
        self.sparse_fields, self.embedding, self.project = sparse_engine(sparse_fields, dim + 1, seed, coalesce)
        self.num_dense = num_dense
        self.dim = dim
        self.dense_linear = nn.Linear(num_dense, 1) if num_dense else None
        fields = len(self.sparse_fields) + len(vectors)
        self.mlp, _ = mlp(dim * fields + num_dense, hidden, dropout=dropout, batch_norm=batch_norm)
        self.vectors = VectorFields(vectors, dim + 1) if vectors else None

    def tables(self):
        return self.embedding.tables()

    def forward(self, batch: dict) -> torch.Tensor:
        """Logits [B] of a batch holding the sparse fields (RaggedTensor or
        [B, L] ids) and, with ``num_dense``, a ``"dense"`` [B, num_dense] float tensor."""
        return self.logits(self.lookup(batch), batch)

    def lookup(self, batch: dict) -> torch.Tensor:
        """The sparse part: pooled rows of every field, [B, F, dim + 1]
        (then the projected vectors, [B, F + V, dim + 1])."""
        rows = self.project.stacked(self.embedding, batch, self.sparse_fields)
        if self.vectors is not None:
            rows = torch.cat([rows, self.vectors(batch, rows.dtype)], 1)
        return rows

    def logits(self, rows: torch.Tensor, batch: dict) -> torch.Tensor:
        """The dense part: first-order, FM and MLP terms from ``lookup``'s rows."""
        v, first = rows[..., : self.dim], rows[..., self.dim]
        logit = first.sum(dim=1)
        logit = logit + 0.5 * (v.sum(1).pow(2) - v.pow(2).sum(1)).sum(1)
        deep_in = v.flatten(1)
        dense = dense_input(batch, self.num_dense, deep_in.dtype)
        if dense is not None:
            logit = logit + self.dense_linear(dense).squeeze(1)
            deep_in = torch.cat([deep_in, dense], dim=1)
        return logit + self.mlp(deep_in).squeeze(1)
