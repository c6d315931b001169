"""BST, the Behaviour Sequence Transformer (Chen et al., 2019): the target
item appended to the user's behaviour sequence, through Transformer layers.

The history (a sequence feature, ``combiner="tuple"``: [B, L, D], oldest
first, zero-padded) and the target item (a pooled feature) make a sequence
of ``L + 1`` tokens; each token gets a learned positional embedding of how
recent it is (the target 0, the history's newest item 1, the one before 2,
..., as the paper's position is the time before the target; items older
than ``max_len`` share the last position: cut histories to ``max_len``
upstream, e.g. ``[[feature]] max_len``). ``blocks`` ``nn.TransformerEncoderLayer``
(``heads`` heads, post-norm, ``dropout`` inside) run over it with the
padding masked out of every attention (``src_key_padding_mask``; the target
is never padding, so a row with an empty history attends to its target
alone). The target's output token, the mean of the history's output
tokens (0 for an empty history), every pooled field's embedding and the
dense features, concatenated, go through an MLP to the logit.

The history and the target should share one table (built from field names
they do: ``shared_name`` = the target).
"""

from __future__ import annotations

import torch
from torch import nn

from recis.models.common import SequenceModel, check_regularization, dense_input, mlp, sequence_engine, zoo_model


@zoo_model("bst")
class BST(SequenceModel):
    def __init__(
        self,
        sparse_fields,
        num_dense: int = 0,
        dim: int = 16,
        *,
        target: str,
        history: str,
        max_len: int = 50,
        blocks: int = 1,
        heads: int = 2,
        feedforward: int = 64,
        hidden: tuple[int, ...] = (200, 80),
        seed: int = 0,
        coalesce: bool = True,
        dropout: float = 0.0,
        batch_norm: bool = False,
    ):
        """``sparse_fields``: names, or {name: EmbeddingOption} of ``dim``
        each (``history``'s with ``combiner="tuple"``); ``target``: the
        pooled field appended to the history; ``max_len``: positions of the
        history; ``blocks``, ``heads`` (dividing ``dim``), ``feedforward``:
        the Transformer layers; ``hidden``: the output MLP's widths."""
        super().__init__()
        check_regularization(dropout, batch_norm, "BST")
        for name, value, low in (("max_len", max_len, 1), ("blocks", blocks, 1), ("heads", heads, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"BST: {name} must be an int >= {low}, got {value!r}")
        if dim % heads:
            raise ValueError(f"BST: heads={heads} must divide dim={dim}")
        self.sparse_fields, self.embedding, self.project = sequence_engine(
            sparse_fields, dim, target, history, seed, coalesce, "BST"
        )
        self.target, self.history, self.max_len = target, history, max_len
        self.pooled_fields = [f for f in self.sparse_fields if f != history]
        self.num_dense, self.dim = num_dense, dim
        self.position = nn.Embedding(max_len + 1, dim)
        nn.init.normal_(self.position.weight, std=0.02)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, heads, feedforward, dropout=float(dropout), batch_first=True)
            for _ in range(blocks)
        )
        width = dim * (len(self.pooled_fields) + 2) + num_dense
        self.mlp, _ = mlp(width, hidden, dropout=dropout, batch_norm=batch_norm)

    def encode(self, query: torch.Tensor, seq: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The Transformer's output tokens [B, 1 + L, dim]: the target's
        first, then the history's (those at padding are not used)."""
        b, length = mask.shape
        lengths = mask.sum(1, keepdim=True)
        back = (lengths - torch.arange(length, device=mask.device).unsqueeze(0)).clamp(1, self.max_len)
        positions = torch.cat([back.new_zeros(b, 1), back], dim=1)
        x = torch.cat([query.unsqueeze(1), seq], dim=1) + self.position(positions)
        padding = torch.cat([mask.new_zeros(b, 1), ~mask], dim=1)
        # Padding never reaches an item: zero it, so that its values cannot
        # be NaN/inf (which a masked-out attention weight of 0 would not cancel).
        x = x.masked_fill(padding.unsqueeze(2), 0.0)
        for layer in self.layers:
            x = layer(x, src_key_padding_mask=padding)
        return x

    def logits(self, pooled: torch.Tensor, seq: torch.Tensor, mask: torch.Tensor, batch: dict) -> torch.Tensor:
        query = pooled[:, self.pooled_fields.index(self.target)]
        x = self.encode(query, seq, mask)
        m = mask.unsqueeze(2).to(x.dtype)
        history = (x[:, 1:] * m).sum(1) / m.sum(1).clamp_min(1.0)
        parts = [pooled.flatten(1), x[:, 0], history]
        dense = dense_input(batch, self.num_dense, x.dtype)
        if dense is not None:
            parts.append(dense)
        return self.mlp(torch.cat(parts, dim=1)).squeeze(1)
