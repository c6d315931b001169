"""`DynamicEmbedding`: pooled embedding lookup over a growing hash table.

Forward: the batch's ids are reduced to distinct ids in Rust (inserting new
ones in training), their rows are gathered into a leaf tensor ``W_u`` [U, D],
and torch's ``embedding_bag`` pools ``W_u`` by the inverse index. Backward
leaves the gradient in ``W_u.grad``; the sparse optimizer (``recis.optim``)
applies it to the table. ``eval()`` never inserts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from recis import _native
from recis.nn.backend import SparseBackend, default_backend
from recis.nn.hash_table import HashTable, TableView, ids_to_numpy, table_for
from recis.nn.options import EmbeddingOption
from recis.ragged import RaggedTensor


def as_ragged(x, weights: torch.Tensor | None = None, pad: int | None = None) -> RaggedTensor:
    """A RaggedTensor from a RaggedTensor or a dense [B, L] id tensor; in the
    latter, elements equal to ``pad`` (if not None) are padding and dropped."""
    if isinstance(x, RaggedTensor):
        if weights is not None:
            return RaggedTensor(x.values, x.offsets, weights)
        return x
    if isinstance(x, torch.Tensor):
        if x.dim() != 2:
            raise ValueError(f"ids: expected a RaggedTensor or a [B, L] tensor, got shape {tuple(x.shape)}")
        if weights is not None and weights.shape != x.shape:
            raise ValueError(f"weights: shape {tuple(weights.shape)} does not match ids {tuple(x.shape)}")
        return RaggedTensor.from_dense(x, pad=pad, weights=weights)
    raise TypeError(f"ids: expected a RaggedTensor or a torch.Tensor, got {type(x).__name__}")


class DynamicEmbedding(nn.Module):
    """Pooled embeddings of bags of 64-bit ids, with no fixed vocabulary.

    Example::

        emb = DynamicEmbedding(EmbeddingOption(dim=16, combiner="mean"))
        opt = recis.optim.SparseAdam(emb.tables(), lr=1e-3)
        out = emb(RaggedTensor(ids, offsets))    # [B, 16]
        out.sum().backward(); opt.step(); opt.zero_grad()
    """

    def __init__(
        self,
        option: EmbeddingOption,
        name: str = "embedding",
        table: HashTable | None = None,
        backend: SparseBackend | None = None,
    ):
        """``backend``: where lookups go (``recis.nn.backend``); by default
        this process's table (under ``torchrun``, where tables are sharded,
        use ``EmbeddingEngine``)."""
        super().__init__()
        self.backend = backend
        if option.combiner == "tuple":
            raise ValueError(f"{name}: combiner 'tuple' (sequences) is for EmbeddingEngine; DynamicEmbedding pools")
        self.option = option
        self.name = name
        self.table = table if table is not None else table_for(option, name)
        if self.table.dim != option.dim:
            raise ValueError(f"{name}: table dim {self.table.dim} != option dim {option.dim}")

    def tables(self) -> list[HashTable]:
        return [self.table]

    def extra_repr(self) -> str:
        return f"name={self.name!r}, dim={self.option.dim}, combiner={self.option.combiner!r}, len={len(self.table)}"

    def lookup_unique(self, ids: torch.Tensor):
        """Distinct ids of a batch and their rows as a tensor ``W_u`` [U, D]
        that requires grad when training: (W_u, inverse)."""
        ids_np = ids_to_numpy(ids, f"{self.name}: ids")
        train = self.training and self.option.trainable and torch.is_grad_enabled()
        missing_initial = train or self.option.eval_missing == "initial"
        if self.backend is None:
            backend = default_backend()
            if backend.name != "local":
                raise RuntimeError(
                    f"{self.name}: DynamicEmbedding keeps its whole table in this process; under torchrun use "
                    "EmbeddingEngine, whose tables are sharded over the ranks"
                )
            self.backend = backend
        block = self.backend.lookup([TableView(self.table, 0)], [ids_np], [train], [missing_initial])
        return block.w, block.inverse

    def forward(self, ids, weights: torch.Tensor | None = None):
        """Pooled [B, D] embeddings of a RaggedTensor or [B, L] id tensor; or,
        given a dict of them, a dict of pooled outputs computed with one table
        lookup for all (the features share this table and its ids)."""
        if isinstance(ids, dict):
            if weights is not None:
                raise ValueError("weights: pass weights inside each RaggedTensor of a dict input")
            return self._forward_many(ids)
        rt = as_ragged(ids, weights, self.option.padding_id)
        if rt.values.dtype != torch.int64:
            raise ValueError(f"{self.name}: ids must be int64, got {rt.values.dtype}")
        device = rt.values.device
        if device.type != "cpu":
            rt = rt.to("cpu")
        w, inverse = self.lookup_unique(rt.values)
        out = pool(w, inverse, rt.offsets, rt.weights, self.option.combiner)
        return out.to(device) if device.type != "cpu" else out

    def _forward_many(self, features: dict) -> dict:
        names = list(features)
        parts = [as_ragged(features[n], pad=self.option.padding_id) for n in names]
        for n, rt in zip(names, parts, strict=True):
            if rt.values.dtype != torch.int64:
                raise ValueError(f"{self.name}: feature {n!r}: ids must be int64, got {rt.values.dtype}")
            if rt.values.device.type != "cpu":
                raise ValueError(f"{self.name}: feature {n!r}: ids must be on the CPU")
        rt = concat_ragged(parts)
        w, inverse = self.lookup_unique(rt.values)
        out = pool(w, inverse, rt.offsets, rt.weights, self.option.combiner)
        return dict(zip(names, out.split([p.batch_size for p in parts]), strict=True))


def concat_ragged(parts: list[RaggedTensor]) -> RaggedTensor:
    """Stacks the bags of several RaggedTensors into one (bags in order)."""
    if len(parts) == 1:
        return parts[0]
    weighted = [p.weights is not None for p in parts]
    if any(weighted) and not all(weighted):
        raise ValueError("concat: either every feature has weights or none has")
    values = torch.cat([p.values for p in parts])
    starts = [0]
    for p in parts[:-1]:
        starts.append(starts[-1] + p.values.numel())
    offsets = torch.cat([parts[0].offsets[:1]] + [p.offsets[1:] + s for p, s in zip(parts, starts, strict=True)])
    weights = torch.cat([p.weights for p in parts]) if all(weighted) else None
    return RaggedTensor(values, offsets, weights, validate=False)


class _PoolStacked(torch.autograd.Function):
    """``pool_stacked``'s forward and backward, both in Rust
    (``recis_core::pool``). The gradient of ``w`` is dense: one summed row a
    looked-up row, so the optimizer has nothing left to group."""

    @staticmethod
    def forward(ctx, w, inverse, offsets, weights, mean, features, fused):
        batch = (offsets.numel() - 1) // features
        out = torch.empty(batch, features, w.shape[1], dtype=w.dtype)
        wn = None if weights is None else weights.numpy()
        _native.pool_forward(w.detach().numpy(), inverse.numpy(), offsets.numpy(), wn, mean, features, out.numpy())
        ctx.args = (inverse, offsets, weights, mean, features, w.shape[0], w.shape[1], fused)
        return out

    @staticmethod
    def backward(ctx, grad):
        inverse, offsets, weights, mean, features, rows, dim, fused = ctx.args
        g = grad.detach().to(torch.float32).contiguous()
        if fused is not None and fused.ready():
            # Optimizer in backward: the pooled gradient goes straight into
            # the update (recis.nn.backend); w gets no gradient.
            fused.apply(g, inverse, offsets, weights, mean, features)
            return None, None, None, None, None, None, None
        gw = torch.empty(rows, dim, dtype=torch.float32)
        wn = None if weights is None else weights.numpy()
        _native.pool_backward(g.numpy(), inverse.numpy(), offsets.numpy(), wn, mean, features, gw.numpy())
        return gw, None, None, None, None, None, None


def pool_stacked(w, inverse, offsets, weights, combiner: str, features: int, fused=None) -> torch.Tensor | None:
    """``pool`` for ``features`` features of one batch size, written
    sample-major: bag ``f * B + b`` of ``offsets`` goes to ``[b, f]`` of the
    [B, features, D] result. None where it does not apply (another dtype, or
    weights that require grad); the caller then pools with ``pool``.
    ``fused``: a ``recis.nn.backend.FusedUpdate`` the backward may hand the
    pooled gradient to instead of computing ``w``'s."""
    if w.dtype != torch.float32 or (weights is not None and weights.requires_grad) or combiner not in ("sum", "mean"):
        return None
    if (offsets.numel() - 1) % features:
        return None
    if weights is not None:
        weights = weights.detach().to(torch.float32).contiguous()
    return _PoolStacked.apply(
        w, inverse.contiguous(), offsets.contiguous(), weights, combiner == "mean", features, fused
    )


def pool(w: torch.Tensor, inverse: torch.Tensor, offsets: torch.Tensor, weights, combiner: str) -> torch.Tensor:
    """Pools rows ``w[inverse]`` into bags given by ``offsets`` ([B + 1]).

    The gradient of ``w`` is sparse (one entry per lookup position): torch's
    sparse backward is several times faster than its dense one here, and the
    sparse optimizer merges entries of the same row anyway."""
    if weights is None:
        return F.embedding_bag(inverse, w, offsets, mode=combiner, include_last_offset=True, sparse=True)
    weights = weights.to(w.dtype)
    out = F.embedding_bag(
        inverse, w, offsets, mode="sum", per_sample_weights=weights, include_last_offset=True, sparse=True
    )
    if combiner == "mean":
        # Weighted mean: divide by each bag's total weight (empty bags stay 0).
        bag = torch.repeat_interleave(torch.arange(offsets.numel() - 1), offsets[1:] - offsets[:-1])
        total = torch.zeros(offsets.numel() - 1, dtype=w.dtype).index_add_(0, bag, weights)
        out = out / torch.where(total == 0, torch.ones_like(total), total).unsqueeze(1)
    return out
