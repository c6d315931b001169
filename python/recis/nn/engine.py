"""`EmbeddingEngine`: every sparse feature of a model, looked up together.

``EmbeddingEngine({feature: EmbeddingOption})`` owns one dynamic table per
feature, or one per ``shared_name`` for features that share a table. Ids are
never merged across tables: the same id in two features is two rows unless
the features share a table by name (collisionless; no id bits are given up
for a table prefix).

A step's lookups are coalesced by config: features pooled the same way (same
``dim`` and ``combiner``, weighted or not) form a group, and a group costs one
native call for all its tables' lookups (``lookup_unique_many``, the tables
in parallel), one gather into one leaf tensor ``W`` [U, D] and one
``embedding_bag`` for all its features. The backward leaves one sparse
gradient on ``W``, which each table's share of reads as a slice; the sparse
optimizer applies it table by table.

Under ``torchrun`` the tables are sharded by rows over the ranks and a
group's lookup is an exchange with the ids' owners (``recis.distributed``).

Sequence features (``combiner="tuple"``) return ``[B, L, D]``: the ids of
each row in order, zero-padded to the longest row of the batch (cut them to
a fixed length upstream with ``features.SequenceTruncate``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from recis import _native, distributed
from recis.distributed.exchange import sharded_lookup
from recis.nn.dynamic_embedding import as_ragged, concat_ragged, pool
from recis.nn.hash_table import HashTable, SharedBlock, ids_to_numpy
from recis.nn.options import EmbeddingOption
from recis.ragged import RaggedTensor


class EmbeddingEngine(nn.Module):
    """Pooled embeddings of many sparse features.

    Example::

        engine = EmbeddingEngine({
            "user": EmbeddingOption(dim=16),
            "item": EmbeddingOption(dim=16, combiner="mean"),
            "clicked_items": EmbeddingOption(dim=16, combiner="tuple", shared_name="item"),
        })
        out = engine(batch)   # {"user": [B, 16], "item": [B, 16], "clicked_items": [B, L, 16]}
        opt = recis.optim.SparseAdam(engine, lr=1e-3)
    """

    def __init__(self, features: dict[str, EmbeddingOption]):
        super().__init__()
        if not features:
            raise ValueError("EmbeddingEngine: needs at least one feature")
        self.options = dict(features)
        self._tables: dict[str, HashTable] = {}
        self.table_of: dict[str, str] = {}
        for name, option in self.options.items():
            if not isinstance(option, EmbeddingOption):
                raise TypeError(f"EmbeddingEngine: feature {name!r}: expected an EmbeddingOption, got {option!r}")
            table_name = option.shared_name or name
            if table_name in self._tables:
                theirs = self._tables[table_name].option.table_config()
                if option.table_config() != theirs:
                    diff = sorted(k for k in theirs if theirs[k] != option.table_config()[k])
                    raise ValueError(
                        f"EmbeddingEngine: feature {name!r} shares table {table_name!r} with another config "
                        f"(differs in {diff})"
                    )
            else:
                # Sharing is resolved inside the engine, not through the
                # process-wide registry of DynamicEmbedding modules: two
                # engines never share a table by accident.
                self._tables[table_name] = HashTable(option, table_name)
            self.table_of[name] = table_name

    def tables(self) -> list[HashTable]:
        return list(self._tables.values())

    def table(self, feature: str) -> HashTable:
        return self._tables[self.table_of[feature]]

    def extra_repr(self) -> str:
        return ", ".join(f"{f}->{t}" for f, t in self.table_of.items())

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """Embeddings of every configured feature present in ``batch``
        (RaggedTensor or [B, L] ids each); other keys are ignored. A
        configured feature missing from the batch is an error."""
        missing = [f for f in self.options if f not in batch]
        if missing:
            raise KeyError(f"EmbeddingEngine: the batch has no {missing} (it has {sorted(batch)})")
        train = self.training and torch.is_grad_enabled()
        groups: dict[tuple, list[tuple[str, RaggedTensor]]] = {}
        for name, option in self.options.items():
            rt = as_ragged(batch[name], pad=option.padding_id)
            if rt.values.dtype != torch.int64:
                raise ValueError(f"EmbeddingEngine: feature {name!r}: ids must be int64, got {rt.values.dtype}")
            if rt.values.device.type != "cpu":
                rt = rt.to("cpu")
            key = (option.dim, option.combiner, rt.weights is not None)
            groups.setdefault(key, []).append((name, rt))
        out = {}
        for (_dim, combiner, _weighted), members in groups.items():
            out.update(self._lookup_group(members, combiner, train))
        return {f: out[f] for f in self.options}

    def _lookup_group(self, members: list[tuple[str, RaggedTensor]], combiner: str, train: bool) -> dict:
        # Features in table order, so each table's lookup positions are one
        # contiguous range of the group's.
        by_table: dict[str, list[tuple[str, RaggedTensor]]] = {}
        for name, rt in members:
            by_table.setdefault(self.table_of[name], []).append((name, rt))
        order = [m for ms in by_table.values() for m in ms]
        tables = [self._tables[t] for t in by_table]
        ids = [
            ids_to_numpy(torch.cat([rt.values for _, rt in ms]) if len(ms) > 1 else ms[0][1].values, f"{t}: ids")
            for t, ms in by_table.items()
        ]
        trainable = [train and t.option.trainable for t in tables]
        if distributed.active():
            missing_initial = [
                tr or t.option.eval_missing == "initial" for t, tr in zip(tables, trainable, strict=True)
            ]
            w, inverse = sharded_lookup(tables, ids, trainable, missing_initial)
            return self._pool(order, w, inverse, combiner)
        found = _native.lookup_unique_many([t.native for t in tables], ids, [t.step for t in tables], trainable)
        sizes = [len(rows) for _, rows, _, _ in found]
        w = torch.empty(sum(sizes), tables[0].dim)
        inverse, lo = [], 0
        for t, (uniq, rows, inv, _), n, tr in zip(tables, found, sizes, trainable, strict=True):
            missing_initial = tr or t.option.eval_missing == "initial"
            t.native.gather(uniq, rows, missing_initial, w[lo : lo + n].numpy())
            inverse.append(torch.from_numpy(inv) + lo if lo else torch.from_numpy(inv))
            lo += n
        inverse = torch.cat(inverse) if len(inverse) > 1 else inverse[0]
        if any(trainable):
            w.requires_grad_(True)
            block = SharedBlock(inverse)
            lo = plo = 0
            for t, (_, rows, inv, _), n, tr in zip(tables, found, sizes, trainable, strict=True):
                if tr:
                    t.add_pending(rows, w, (block, lo, lo + n, plo, plo + len(inv)))
                lo += n
                plo += len(inv)
        return self._pool(order, w, inverse, combiner)

    def _pool(self, order, w: torch.Tensor, inverse: torch.Tensor, combiner: str) -> dict:
        rts = [rt for _, rt in order]
        if combiner == "tuple":
            return self._sequences(order, w, inverse)
        rt = concat_ragged(rts)
        pooled = pool(w, inverse, rt.offsets, rt.weights, combiner)
        return dict(zip([n for n, _ in order], pooled.split([r.batch_size for r in rts]), strict=True))

    @staticmethod
    def _sequences(order, w: torch.Tensor, inverse: torch.Tensor) -> dict:
        """[B, L, D] per feature, zero-padded: each feature's lookup
        positions are a slice of ``inverse``, in row order."""
        out, at = {}, 0
        for name, rt in order:
            n = rt.values.numel()
            lengths = rt.offsets[1:] - rt.offsets[:-1]
            width = int(lengths.max()) if lengths.numel() else 0
            rows = torch.repeat_interleave(torch.arange(rt.batch_size), lengths)
            cols = torch.arange(n) - rt.offsets[:-1].repeat_interleave(lengths)
            emb = F.embedding(inverse[at : at + n], w, sparse=True)
            if rt.weights is not None:
                emb = emb * rt.weights.to(emb.dtype).unsqueeze(1)
            dense = emb.new_zeros(rt.batch_size, width, w.shape[1])
            out[name] = dense.index_put((rows, cols), emb)
            at += n
        return out


__all__ = ["EmbeddingEngine"]
