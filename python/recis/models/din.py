"""DIN, the Deep Interest Network (Zhou et al., 2018): target attention over
a behaviour sequence.

A user's history (a sequence feature, ``combiner="tuple"``: [B, L, D], the
items oldest first, zero-padded) is read against the target item (a pooled
feature): an attention MLP over ``[q, k, q - k, q * k]`` (``q`` the target's
embedding, ``k`` a history item's), through a sigmoid, gives each history
position a weight in (0, 1) (not normalized over the history, as in the
paper: the sum keeps how much of the history is relevant, and a history
starts as its sum halved); padding positions weigh 0 and never reach the
MLP, and the weighted sum of the history is the user's interest in this
target. The
interest, its product with the target's embedding (as the authors' code
feeds it), every pooled field's embedding (the target's among them) and
the dense features, concatenated, go through an MLP to the logit.

The history and the target should share one table (built from field names
they do: ``shared_name`` = the target), so that an item's embedding is the
same as a target and in a history.
"""

from __future__ import annotations

import torch

from recis.models.common import SequenceModel, check_regularization, dense_input, mlp, sequence_engine, zoo_model


@zoo_model("din")
class DIN(SequenceModel):
    def __init__(
        self,
        sparse_fields,
        num_dense: int = 0,
        dim: int = 16,
        *,
        target: str,
        history: str,
        attention: tuple[int, ...] = (64, 32),
        hidden: tuple[int, ...] = (200, 80),
        seed: int = 0,
        coalesce: bool = True,
        dropout: float = 0.0,
        batch_norm: bool = False,
    ):
        """``sparse_fields``: names, or {name: EmbeddingOption} of ``dim``
        each (``history``'s with ``combiner="tuple"``); ``target``: the
        pooled field the history is read against; ``attention``: the hidden
        widths of the attention MLP; ``hidden``: those of the output MLP."""
        super().__init__()
        check_regularization(dropout, batch_norm, "DIN")
        self.sparse_fields, self.embedding, self.project = sequence_engine(
            sparse_fields, dim, target, history, seed, coalesce, "DIN"
        )
        self.target, self.history = target, history
        self.pooled_fields = [f for f in self.sparse_fields if f != history]
        self.num_dense, self.dim = num_dense, dim
        self.attention, _ = mlp(4 * dim, attention, dropout=dropout, batch_norm=batch_norm)
        width = dim * (len(self.pooled_fields) + 2) + num_dense
        self.mlp, _ = mlp(width, hidden, dropout=dropout, batch_norm=batch_norm)

    def attention_weights(self, query: torch.Tensor, seq: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[B, L] weights of the history positions for the target ``query``
        [B, dim]: sigmoid(the attention MLP) at the items, 0 at padding
        (whose rows never enter the MLP)."""
        keys = seq[mask]  # [N, dim], the items only
        q = query.unsqueeze(1).expand_as(seq)[mask]
        scores = torch.sigmoid(self.attention(torch.cat([q, keys, q - keys, q * keys], dim=1))).squeeze(1)
        return scores.new_zeros(mask.shape).masked_scatter(mask, scores)

    def logits(self, pooled: torch.Tensor, seq: torch.Tensor, mask: torch.Tensor, batch: dict) -> torch.Tensor:
        query = pooled[:, self.pooled_fields.index(self.target)]
        weights = self.attention_weights(query, seq, mask)
        interest = torch.bmm(weights.unsqueeze(1), seq).squeeze(1)  # [B, dim]
        parts = [pooled.flatten(1), interest, query * interest]
        dense = dense_input(batch, self.num_dense, interest.dtype)
        if dense is not None:
            parts.append(dense)
        return self.mlp(torch.cat(parts, dim=1)).squeeze(1)
