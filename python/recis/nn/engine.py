"""`EmbeddingEngine`: every sparse feature of a model, looked up together.

``EmbeddingEngine({feature: EmbeddingOption})`` gives each feature a logical
table of its own, or one per ``shared_name`` for features that share a
table. Logical tables whose options define the same table (dim, dtype,
initializer, admission, eviction — everything but the seed) are coalesced
into one physical ``HashTable``, each a namespace of it: one row store, one
id map split into per-namespace shards, one optimizer call, one eviction,
one checkpoint entry. Ids are never merged: the same id in two features is
two keys and two rows unless the features share a table by name
(collisionless at the full 64 bits; no id bits are given up for a table
prefix), and each namespace keeps its own initializer seed.

A step's lookups are coalesced too: features pooled the same way (same
``dim`` and ``combiner``, weighted or not) form a group, and a group costs one
native call for all its lookups and the gather of their rows into one leaf
tensor ``W`` [U, D] (``lookup_gather_many``, the namespaces in parallel), and
one pooling pass for all its features, in Rust, written sample-major as [B, F, D]
(``stacked`` returns it as is; ``forward`` returns its slices). The backward
gives ``W`` a dense gradient, one summed row per distinct row, which each
physical table's share of reads as a slice and the optimizer applies without
grouping. (Pooling falls back to torch's ``embedding_bag``, with a sparse
gradient, for features of different batch sizes or weights that require
grad.)

Where a group's lookup goes is the engine's backend (``recis.nn.backend``),
chosen once: this process's tables, or, under ``torchrun``, tables sharded
by rows over the ranks, where a group's lookup is an exchange with the ids'
owners (``recis.distributed``). With an optimizer in backward
(``in_backward=True``) the pooling's backward hands the pooled gradient to
the update directly and ``W`` gets no gradient.

Sequence features (``combiner="tuple"``) return ``[B, L, D]``: the ids of
each row in order, zero-padded to the longest row of the batch (cut them to
a fixed length upstream with ``features.SequenceTruncate``).

The tables appear in ``state_dict()``, so that torch tooling that walks a
state dict sees them: each logical table ``L`` as ``tables.L.ids`` (int64,
ascending) and ``tables.L.weight`` ([N, dim] float32, the embeddings; no
optimizer slots, no metadata; under ``torchrun`` the rows this rank holds).
``load_state_dict`` replaces a logical table's rows with the ones given
(new rows' optimizer slots start afresh) and leaves a table the dict does
not name as it is, so a dict of the dense weights alone still loads.
``CheckpointManager`` stays the streaming path for huge tables (this one
holds a table's rows twice while it runs); inside ``dense_only()``,
``state_dict`` leaves the tables out.
"""

from __future__ import annotations

import contextlib
import contextvars

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from recis.nn.backend import SparseBackend, default_backend
from recis.nn.dynamic_embedding import as_ragged, concat_ragged, pool, pool_stacked
from recis.nn.hash_table import HashTable, TableView, ids_to_numpy
from recis.nn.options import EmbeddingOption
from recis.ragged import RaggedTensor

_TABLES_IN_STATE_DICT = contextvars.ContextVar("recis_tables_in_state_dict", default=True)


@contextlib.contextmanager
def dense_only():
    """Inside it, ``state_dict()`` of a module holding ``EmbeddingEngine``s
    leaves their tables out (checkpoints and serving exports write the
    tables their own way, a chunk at a time)."""
    token = _TABLES_IN_STATE_DICT.set(False)
    try:
        yield
    finally:
        _TABLES_IN_STATE_DICT.reset(token)


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

    ``coalesce=False`` keeps one physical table per logical table.
    """

    def __init__(
        self, features: dict[str, EmbeddingOption], coalesce: bool = True, backend: SparseBackend | None = None
    ):
        """``backend``: where lookups go (``recis.nn.backend``); by default
        chosen at the first lookup: sharded over the ranks under
        ``torchrun``, else local."""
        super().__init__()
        self.backend = backend
        if not features:
            raise ValueError("EmbeddingEngine: needs at least one feature")
        if not isinstance(coalesce, bool):
            raise TypeError(f"EmbeddingEngine: coalesce must be True or False, got {coalesce!r}")
        self.options = dict(features)
        # Logical tables: a feature's own, or its shared name's.
        logical: dict[str, EmbeddingOption] = {}
        self.table_of: dict[str, str] = {}
        for name, option in self.options.items():
            if not isinstance(option, EmbeddingOption):
                raise TypeError(f"EmbeddingEngine: feature {name!r}: expected an EmbeddingOption, got {option!r}")
            table_name = option.shared_name or name
            if table_name in logical:
                theirs, mine = logical[table_name].table_config(), option.table_config()
                if mine != theirs:
                    diff = sorted(k for k in theirs if theirs[k] != mine[k])
                    raise ValueError(
                        f"EmbeddingEngine: feature {name!r} shares table {table_name!r} with another config "
                        f"(differs in {diff})"
                    )
            else:
                # Sharing is resolved inside the engine, not through the
                # process-wide registry of DynamicEmbedding modules: two
                # engines never share a table by accident.
                logical[table_name] = option
            self.table_of[name] = table_name
        # Physical tables: logical tables of one config (but the seed) as
        # namespaces of one table, in the order of their first feature.
        by_config: dict[str, list[str]] = {}
        for table_name, option in logical.items():
            cfg = dict(option.table_config())
            del cfg["seed"]
            key = repr(sorted(cfg.items())) if coalesce else table_name
            by_config.setdefault(key, []).append(table_name)
        self._tables: dict[str, HashTable] = {}
        self._views: dict[str, TableView] = {}
        for names in by_config.values():
            first = logical[names[0]]
            if len(names) == 1:
                table = HashTable(first, names[0])
            else:
                # Named after its first logical table and how many others
                # it holds; never the name of another table.
                name = base = f"{names[0]}+{len(names) - 1}"
                while name in logical or name in self._tables:
                    name = f"{base}~{len(name) - len(base) + 1}"
                table = HashTable(first, name, [(n, logical[n].seed) for n in names])
            self._tables[table.name] = table
            for n in names:
                self._views[n] = table.view(n)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if not _TABLES_IN_STATE_DICT.get():
            return
        for name, view in self._views.items():
            table, ns = view.table, view.ns
            ids, rows, nss = table.native.export_keys()
            if len(table.namespaces) > 1:
                sel = np.flatnonzero(nss == ns)
                ids, rows = ids[sel], rows[sel]
            order = np.argsort(ids, kind="stable")
            ids, rows = ids[order], rows[order]
            v, _f, _s = table.native.read_rows(rows)
            width = table.dim + table.native.slot_width
            weight = np.ascontiguousarray(v.reshape(len(ids), width)[:, : table.dim])
            destination[f"{prefix}tables.{name}.ids"] = torch.from_numpy(ids)
            destination[f"{prefix}tables.{name}.weight"] = torch.from_numpy(weight)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        given = {}
        for name in self._views:
            keys = (f"{prefix}tables.{name}.ids", f"{prefix}tables.{name}.weight")
            if keys[0] in state_dict or keys[1] in state_dict:
                given[name] = keys
        rest = {k: v for k, v in state_dict.items() if not k.startswith(f"{prefix}tables.")}
        stray = sorted(k for k in state_dict if k.startswith(f"{prefix}tables.") and k not in rest)
        known = {k for keys in given.values() for k in keys}
        unexpected_keys.extend(k for k in stray if k not in known)
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)
        checked = []
        for name, (k_ids, k_weight) in given.items():
            view = self._views[name]
            if k_ids not in state_dict or k_weight not in state_dict:
                errors.append(f"table {name!r}: needs both {k_ids} and {k_weight}")
                continue
            ids, weight = state_dict[k_ids], state_dict[k_weight]
            if ids.dtype != torch.int64 or ids.dim() != 1:
                errors.append(f"{k_ids}: must be 1-D int64, got {ids.dtype} {tuple(ids.shape)}")
                continue
            if weight.dim() != 2 or tuple(weight.shape) != (len(ids), view.dim):
                errors.append(f"{k_weight}: must be [{len(ids)}, {view.dim}], got {tuple(weight.shape)}")
                continue
            if len(torch.unique(ids)) != len(ids):
                errors.append(f"{k_ids}: ids repeat")
                continue
            checked.append((view, ids, weight))
        if errors:
            return
        for view, ids, weight in checked:
            table, ns = view.table, view.ns
            held, _rows, nss = table.native.export_keys()
            if len(table.namespaces) > 1:
                held = held[nss == ns]
            table.native.remove_ids(np.ascontiguousarray(held), ns)
            n = len(ids)
            slots = np.full((n, table.native.slot_width), table._slot_init, dtype=np.float32)
            values = np.ascontiguousarray(np.concatenate([weight.detach().cpu().float().numpy(), slots], axis=1))
            zeros = np.zeros(n, dtype=np.uint32)
            table.native.import_rows(ids.cpu().numpy(), values, zeros, np.full(n, table.step, np.uint32), ns)

    def tables(self) -> list[HashTable]:
        """The physical tables (what the sparse optimizer and checkpoints see)."""
        return list(self._tables.values())

    def logical_tables(self) -> dict[str, TableView]:
        """Every logical table (a feature's, or a shared name's) by name."""
        return dict(self._views)

    def table(self, feature: str) -> TableView:
        """The logical table of ``feature``: its namespace of a physical table."""
        return self._views[self.table_of[feature]]

    def extra_repr(self) -> str:
        views = getattr(self, "_views", {})
        return ", ".join(f"{f}->{views[t].table.name}" for f, t in self.table_of.items() if t in views)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """Embeddings of every configured feature present in ``batch``
        (RaggedTensor or [B, L] ids each); other keys are ignored. A
        configured feature missing from the batch is an error.

        Pooled features of one group are computed as one [B, F, D] tensor
        and returned as its slices ``[:, k]`` (views, not contiguous);
        ``stacked`` returns the tensor itself."""
        return self._run(batch, {})

    def stacked(self, batch: dict, features: list[str] | None = None) -> torch.Tensor:
        """The pooled embeddings of ``features`` (default: all, in the
        configured order) side by side: [B, len(features), D]. When they are
        one group in that order this is the pooled tensor itself, no copy."""
        names = list(self.options) if features is None else list(features)
        unknown = [n for n in names if n not in self.options]
        if unknown:
            raise KeyError(f"EmbeddingEngine.stacked: no features {unknown} (it has {list(self.options)})")
        stacks: dict = {}
        out = self._run(batch, stacks)
        if names and all(n in stacks for n in names):
            base = stacks[names[0]][0]
            if all(stacks[n][0] is base for n in names):
                idx = [stacks[n][1] for n in names]
                if idx == list(range(base.shape[1])):
                    return base
                return base[:, idx]
        return torch.stack([out[n] for n in names], dim=1)

    def _run(self, batch: dict, stacks: dict) -> dict[str, torch.Tensor]:
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
            out.update(self._lookup_group(members, combiner, train, stacks))
        return {f: out[f] for f in self.options}

    def _lookup_group(self, members: list[tuple[str, RaggedTensor]], combiner: str, train: bool, stacks: dict) -> dict:
        # Features by logical table, the logical tables by physical table, so
        # each logical and each physical table's lookup positions and rows of
        # W are one contiguous range of the group's.
        by_table: dict[str, list[tuple[str, RaggedTensor]]] = {}
        for name, rt in members:
            by_table.setdefault(self.table_of[name], []).append((name, rt))
        physical = list(self._tables)
        logical = sorted(by_table, key=lambda t: physical.index(self._views[t].table.name))
        order = [m for t in logical for m in by_table[t]]
        views = [self._views[t] for t in logical]
        ids = []
        for t in logical:
            ms = by_table[t]
            ids.append(
                ids_to_numpy(torch.cat([rt.values for _, rt in ms]) if len(ms) > 1 else ms[0][1].values, f"{t}: ids")
            )
        trainable = [train and self.options[by_table[t][0][0]].trainable for t in logical]
        missing_initial = [
            tr or self.options[by_table[t][0][0]].eval_missing == "initial"
            for t, tr in zip(logical, trainable, strict=True)
        ]
        if self.backend is None:
            self.backend = default_backend()
        block = self.backend.lookup(views, ids, trainable, missing_initial)
        return self._pool(order, block, combiner, stacks)

    def _pool(self, order, block, combiner: str, stacks: dict) -> dict:
        w, inverse = block.w, block.inverse
        rts = [rt for _, rt in order]
        if combiner == "tuple":
            return self._sequences(order, w, inverse)
        rt = concat_ragged(rts)
        names = [n for n, _ in order]
        if all(r.batch_size == rts[0].batch_size for r in rts):
            # [B, F, D] in one Rust pass; each feature's output is a view.
            stacked = pool_stacked(w, inverse, rt.offsets, rt.weights, combiner, len(rts), block.fused)
            if stacked is not None:
                for k, n in enumerate(names):
                    stacks[n] = (stacked, k)
                return {n: stacked[:, k] for k, n in enumerate(names)}
        pooled = pool(w, inverse, rt.offsets, rt.weights, combiner)
        return dict(zip(names, pooled.split([r.batch_size for r in rts]), strict=True))

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
