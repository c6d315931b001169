"""`HashTable`: the Python face of one Rust id → row table.

Owns the native table, the training step it stamps on ids, and the gradients
of rows looked up since the last optimizer step (handed to the sparse
optimizer, which sums them per row). It does no arithmetic itself.

A table may hold several namespaces (id spaces): the tables of several
features with one configuration, coalesced by ``EmbeddingEngine`` into one
table with one row store, one optimizer call, one eviction and one
checkpoint entry. The same id in two namespaces is two rows (collisionless
at the full 64 bits). ``TableView`` is one namespace seen as a table.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass

import numpy as np
import torch

from recis import _native
from recis.nn.options import EmbeddingOption

NO_ROW = _native.NO_ROW


def ids_to_numpy(ids: torch.Tensor, what: str = "ids") -> np.ndarray:
    """A contiguous int64 numpy view of a CPU id tensor (no copy when possible)."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(ids).__name__}")
    if ids.dtype != torch.int64:
        raise ValueError(f"{what} must be int64, got {ids.dtype}")
    if ids.dim() != 1:
        raise ValueError(f"{what} must be 1-D, got shape {tuple(ids.shape)}")
    return ids.detach().cpu().contiguous().numpy()


_SHARED: weakref.WeakValueDictionary[str, HashTable] = weakref.WeakValueDictionary()


@dataclass
class SavedTable:
    """What ``HashTable.save`` wrote: its files' names, and how many rows hold
    a non-finite value (with one of their ids), for the checkpoint to mark."""

    files: list[str]
    nonfinite_rows: int
    nonfinite_id: int | None


def table_for(option: EmbeddingOption, name: str) -> HashTable:
    """A new table, or — when ``option.shared_name`` is set — the live table of
    that name, which every module naming it shares. The options must agree on
    everything that defines the table (dim, initializer, admission, eviction,
    seed); pooling (combiner) may differ."""
    if option.shared_name is None:
        return HashTable(option, name)
    table = _SHARED.get(option.shared_name)
    if table is None:
        table = HashTable(option, option.shared_name)
        _SHARED[option.shared_name] = table
        return table
    mine, theirs = option.table_config(), table.option.table_config()
    if mine != theirs:
        diff = sorted(k for k in mine if mine[k] != theirs[k])
        raise ValueError(
            f"{name}: shared table {option.shared_name!r} exists with another config (differs in {diff}); "
            "modules sharing a table must agree on dim, initializer, admission, eviction and seed"
        )
    return table


class HashTable:
    """A collisionless, growing embedding table for any 64-bit ids.

    Example::

        table = HashTable(EmbeddingOption(dim=8), name="user_id")
        rows = table.lookup(torch.tensor([3, -7, 2**62]))   # NO_ROW: absent
    """

    def __init__(self, option: EmbeddingOption, name: str = "table", namespaces: list[tuple[str, int]] | None = None):
        """``namespaces``: (name, initializer seed) of each id space the
        table holds; None: one, named ``name`` and seeded by ``option.seed``."""
        self.option = option
        self.name = name
        coalesced = namespaces is not None
        namespaces = list(namespaces) if coalesced else [(name, option.seed)]
        if not namespaces:
            raise ValueError(f"table {name!r}: needs at least one namespace")
        names = [n for n, _ in namespaces]
        if len(set(names)) != len(names):
            raise ValueError(f"table {name!r}: namespace names repeat: {names}")
        self.namespaces = names
        self.namespace_seeds = [int(s) for _, s in namespaces]
        self._ns_index = {n: k for k, n in enumerate(names)}
        init_kind, init_params = option.initializer.spec()
        adm_kind, adm_params = option.admission.spec()
        self.native = _native.HashTable(
            option.dim,
            init_kind,
            [float(x) for x in init_params],
            option.seed,
            adm_kind,
            [float(x) for x in adm_params],
            option.num_shards,
            option.initial_capacity * len(names),
            self.namespace_seeds if coalesced else None,
        )
        # Training step stamped on ids as their last sighting (for TTL/LRU).
        self.step = 0
        self._pending: list[tuple[np.ndarray, torch.Tensor]] = []
        self._optimizer_kind: str | None = None
        self._slot_init = 0.0
        # The sparse optimizer that updates this table in backward, if any
        # (``SparseOptimizer(..., in_backward=True)``).
        self.in_backward = None

    @property
    def dim(self) -> int:
        return self.option.dim

    def __len__(self) -> int:
        return len(self.native)

    def __repr__(self) -> str:
        ns = f", namespaces={len(self.namespaces)}" if len(self.namespaces) > 1 else ""
        return f"HashTable(name={self.name!r}, dim={self.dim}, len={len(self)}{ns})"

    def ns_index(self, namespace: str) -> int:
        try:
            return self._ns_index[namespace]
        except KeyError:
            raise KeyError(f"table {self.name!r} has no namespace {namespace!r} (it has {self.namespaces})") from None

    def view(self, namespace: str) -> TableView:
        """One namespace of the table, seen as a table."""
        return TableView(self, self.ns_index(namespace))

    def table_config(self) -> dict:
        """What defines the table, as JSON (checked when a checkpoint loads):
        the option's table config and, for a coalesced table, its namespaces
        with their seeds in place of the option's seed."""
        cfg = self.option.table_config()
        if len(self.namespaces) > 1 or self.namespaces[0] != self.name:
            del cfg["seed"]
            cfg["namespaces"] = [[n, s] for n, s in zip(self.namespaces, self.namespace_seeds, strict=True)]
        return cfg

    def stats(self) -> dict:
        """Size and memory: len, id-map slots, rows, bytes by part."""
        return self.native.stats()

    # -- lookups --------------------------------------------------------------

    def lookup(self, ids: torch.Tensor, ns: int = 0) -> np.ndarray:
        """Row of each id (``NO_ROW`` where absent). Inserts nothing."""
        return self.native.lookup(ids_to_numpy(ids), ns)

    def embeddings(self, ids: torch.Tensor, missing: str = "zeros", ns: int = 0) -> torch.Tensor:
        """Current embedding of each id, [n, dim] (a copy); inserts nothing."""
        ids_np = ids_to_numpy(ids)
        rows = self.native.lookup(ids_np, ns)
        out = torch.empty(len(ids_np), self.dim)
        self.native.gather(ids_np, rows, missing == "initial", out.numpy(), ns)
        return out

    def initial_values(self, ids: torch.Tensor, ns: int = 0) -> torch.Tensor:
        """The would-be initial embedding of each id, [n, dim]."""
        ids_np = ids_to_numpy(ids)
        out = torch.empty(len(ids_np), self.dim)
        self.native.initial_values(ids_np, out.numpy(), ns)
        return out

    def lookup_unique(self, ids_np: np.ndarray, train: bool, ns: int = 0):
        """Distinct ids of a batch with their rows: (ids, rows, inverse, counts).
        In training new ids are inserted (subject to admission)."""
        if train:
            return self.native.lookup_or_insert_unique(ids_np, self.step, ns)
        return self.native.lookup_unique(ids_np, ns)

    def gather(self, ids_np: np.ndarray, rows: np.ndarray, missing_initial: bool, ns: int = 0) -> torch.Tensor:
        out = torch.empty(len(rows), self.dim)
        self.native.gather(ids_np, rows, missing_initial, out.numpy(), ns)
        return out

    # -- gradients --------------------------------------------------------------

    def add_pending(self, rows, weights: torch.Tensor, part=None) -> None:
        """Records a looked-up block of rows whose ``.grad`` the next
        optimizer step applies. ``rows``: a ``_native.Ticket`` (the rows of
        a trainable lookup, distinct and vouched for by the core) or a
        uint32 array. ``part``: the rows are a share of a block ``weights``
        that several tables fill (``nn.engine``)."""
        self._pending.append((rows, weights, part))

    def pending_gradients(self, entries=None):
        """Gradients of every pending lookup (or of ``entries``, some of
        them) that received one, as
        (rows, index, grads): ``grads[k]`` belongs to row ``index[k]`` of the
        rows, which are a list of Tickets (concatenated in order) or one
        uint32 array. A block's gradient may be sparse (one entry per lookup
        position, from sparse pooling) or dense ([U, D]); the optimizer sums
        entries of the same row. None if there is nothing to apply."""
        rows, index, grads = [], [], []
        base = 0
        for r, w, part in self._pending if entries is None else entries:
            if part is not None:
                got = part_gradient(w, part)
                if got is None:
                    continue
                idx, vals = got
            elif w.grad is None:
                continue
            elif w.grad.is_sparse:
                idx, vals = w.grad._indices()[0], w.grad._values()
            else:
                idx, vals = torch.arange(len(r)), w.grad
            rows.append(r)
            index.append(idx + base if base else idx)
            grads.append(vals)
            base += len(r)
        if not rows:
            return None
        if all(isinstance(r, _native.Ticket) for r in rows):
            rows_arg = rows
        else:
            rows_arg = concat([r.rows() if isinstance(r, _native.Ticket) else r for r in rows])
        if len(index) == 1:
            return rows_arg, index[0].numpy(), grads[0].detach().contiguous().numpy()
        return rows_arg, torch.cat(index).numpy(), torch.cat(grads).detach().contiguous().numpy()

    def pending_leaves(self) -> list[torch.Tensor]:
        """The leaf tensors of the pending lookups (a shared block appears in
        every table that reads from it)."""
        return [w for _rows, w, _part in self._pending]

    def clear_pending(self) -> None:
        self._pending.clear()

    def waits_for(self, leaf: torch.Tensor) -> bool:
        """True if a pending lookup of this table reads ``leaf``."""
        return any(w is leaf for _r, w, _p in self._pending)

    def all_arrived(self) -> bool:
        """True if every pending lookup has its gradient (an update in
        backward waits for the last one, so that a row read by several
        lookups of one step gets one update, as torch's would)."""
        return bool(self._pending) and all(w.grad is not None for _r, w, _p in self._pending)

    def only_reads(self, leaf: torch.Tensor) -> bool:
        """True if there are pending lookups and all of them read ``leaf``."""
        return bool(self._pending) and all(w is leaf for _r, w, _p in self._pending)

    def take_pending(self) -> list:
        """Removes and returns every pending lookup (for an update in
        backward)."""
        mine, self._pending = self._pending, []
        return mine

    def release_gradients(self) -> list[torch.Tensor]:
        """``zero_grad`` for this table: drops the pending lookups whose
        gradient has arrived and returns their leaves (whose ``.grad`` the
        caller clears, once every table sharing them has been asked). A
        lookup whose backward has not run yet stays pending: in the usual
        loop ``forward; zero_grad(); backward(); step()`` its gradient comes
        after this call."""
        done = [e for e in self._pending if e[1].grad is not None]
        self._pending = [e for e in self._pending if e[1].grad is None]
        return [w for _rows, w, _part in done]

    # -- optimizer slots -----------------------------------------------------------

    def attach_optimizer(self, kernel, kind: str) -> None:
        """Lays out the optimizer's slots in every row. A table serves one
        sparse optimizer; attaching another resets the slots."""
        width, init = kernel.slot_layout(self.dim)
        if self._optimizer_kind is not None and self._optimizer_kind != kind:
            raise ValueError(
                f"table {self.name!r} is already driven by a {self._optimizer_kind} optimizer; "
                f"a table serves one sparse optimizer"
            )
        if self._optimizer_kind is None:
            self.native.set_slots(width, init)
            self._optimizer_kind = kind
            self._slot_init = init

    # -- maintenance -------------------------------------------------------------

    def evict(self, step: int | None = None, by_namespace: bool = False, **policy):
        """Removes ids by the given criteria (``ttl_steps``, ``min_frequency``,
        ``max_rows``, ``score``, ``min_l2_norm``; by default the option's
        ``eviction``, whose ``max_rows`` is per namespace: a coalesced table
        of N features keeps at most N × ``max_rows`` rows, ranked together).
        Returns the evicted ids, or with ``by_namespace`` a dict of them by
        namespace name."""
        if self._pending:
            raise RuntimeError(
                f"table {self.name!r}: evict() with gradients pending; call the optimizer's step() or zero_grad() first"
            )
        if not policy:
            ev = self.option.eviction
            if ev is None:
                raise ValueError(f"table {self.name!r} has no eviction option and none was given")
            max_rows = ev.max_rows
            if max_rows is not None:
                max_rows *= len(self.namespaces)
            if max_rows is not None:
                from recis.nn.backend import row_shards

                # A sharded table: each rank keeps its share of the cap.
                max_rows = -(-max_rows // row_shards())
            policy = {
                "ttl_steps": ev.ttl_steps,
                "min_frequency": ev.min_frequency,
                "max_rows": max_rows,
                "score": ev.score,
                "min_l2_norm": ev.min_l2_norm,
            }
        unknown = set(policy) - {"ttl_steps", "min_frequency", "max_rows", "score", "min_l2_norm"}
        if unknown:
            raise ValueError(f"evict: unknown criteria {sorted(unknown)}")
        ids, ns = self.native.evict(self.step if step is None else step, **policy)
        ids = torch.from_numpy(ids)
        if not by_namespace:
            return ids
        ns = torch.from_numpy(ns.astype(np.int64))
        return {name: ids[ns == k] for k, name in enumerate(self.namespaces)}

    def chunks(self, chunk_rows: int = 1 << 20):
        """The table's state as dicts of at most ``chunk_rows`` rows: ids,
        values (embedding and optimizer slots), frequency, last step; the
        first also the admission state and step. A table of several
        namespaces adds each id's namespace index. At least one (empty for an
        empty table). Only one chunk of rows exists at a time, beside the ids,
        row indices and namespaces (16 bytes an id)."""
        ids, rows, nss = self.native.export_keys()
        several = len(self.namespaces) > 1
        width = self.dim + self.native.slot_width
        for start in range(0, max(len(rows), 1), chunk_rows):
            v, f, s = self.native.read_rows(rows[start : start + chunk_rows])
            part = {
                "ids": torch.from_numpy(ids[start : start + chunk_rows]),
                "values": torch.from_numpy(v).reshape(-1, width),
                "frequency": torch.from_numpy(f.astype(np.int64)),
                "last_step": torch.from_numpy(s.astype(np.int64)),
            }
            if several:
                part["namespace"] = torch.from_numpy(nss[start : start + chunk_rows].astype(np.int64))
            if start == 0:
                counters, epoch = self.native.admission_state()
                part["admission_counters"] = torch.from_numpy(counters.astype(np.int64))
                part["admission_epoch"] = torch.tensor([epoch], dtype=torch.int64)
                part["step"] = torch.tensor([self.step], dtype=torch.int64)
            yield part

    def state_dict(self, chunk_rows: int = 1 << 20) -> dict[str, torch.Tensor]:
        """Every id with its row (embedding and optimizer slots) and metadata,
        in one dict (``save`` writes a large table without assembling it)."""
        parts = list(self.chunks(chunk_rows))
        out = dict(parts[0])
        for key in ("ids", "values", "frequency", "last_step", "namespace"):
            if key in out:
                out[key] = torch.cat([p[key] for p in parts])
        return out

    def save(self, directory: str, prefix: str, chunk_rows: int = 1 << 20) -> SavedTable:
        """Writes ``chunks`` as safetensors files ``{prefix}.{k:05d}.safetensors``
        and returns their names, with the rows found holding a NaN or an
        infinity (embedding or optimizer slot) on the way: a table is never
        held twice while it is saved, nor read twice."""
        from safetensors.torch import save_file

        saved = SavedTable([], 0, None)
        for k, part in enumerate(self.chunks(chunk_rows)):
            bad = ~torch.isfinite(part["values"]).all(dim=1)
            if bool(bad.any()):
                if saved.nonfinite_id is None:
                    saved.nonfinite_id = int(part["ids"][bad][0])
                saved.nonfinite_rows += int(bad.sum())
            name = f"{prefix}.{k:05d}.safetensors"
            path = os.path.join(directory, name)
            save_file(part, path)
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
            saved.files.append(name)
        return saved

    def load(
        self,
        directory: str,
        names: list[str],
        embeddings_only: bool = False,
        keep=None,
        merged: int = 1,
        namespaces: dict[int, int] | None = None,
        clear: bool = True,
        admission: bool = True,
    ) -> None:
        """Reads what ``save`` wrote, a chunk at a time. Every file's header
        is checked (present, complete, the right widths) before the table
        changes. ``keep(ids) -> bool mask``: import only those ids (a
        checkpoint re-sharded to another world size). ``merged``: the files
        are the shards of that many tables; their admission counters are
        summed (each id was counted only by its owner's). ``namespaces``:
        {the saved table's namespace index: this table's} (a table of one
        namespace saved none: its index is 0): rows of other namespaces are
        left out (None: the saved namespaces are this table's). ``clear``:
        empty the table first (False: add to it, several saved tables
        loading into one). ``admission``: restore the admission counters
        (only meaningful when the saved table holds this table's namespaces,
        in order). The table's clock becomes the latest of the loaded ones."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        width = self.dim + self.native.slot_width
        for name in names:
            path = os.path.join(directory, name)
            try:
                with safe_open(path, "pt") as f:
                    keys = set(f.keys())
                    shape = f.get_slice("values").get_shape() if "values" in keys else None
            except Exception as e:  # noqa: BLE001 - safetensors raises several kinds
                raise ValueError(f"table {self.name!r}: {path}: unreadable ({e})") from None
            missing = {"ids", "values", "frequency", "last_step"} - keys
            if missing:
                raise ValueError(f"table {self.name!r}: {path}: missing {sorted(missing)}")
            if len(shape) != 2 or (shape[1] != width and not (embeddings_only and shape[1] >= self.dim)):
                raise ValueError(
                    f"table {self.name!r}: {path}: rows are {shape[1:]} wide but this table's are {width} "
                    f"(dim {self.dim} + {self.native.slot_width} optimizer slots); another dim or optimizer?"
                )
        if clear:
            self.native.clear()
            self.step = 0
        counters, epoch = None, 0
        for k, name in enumerate(names):
            state = load_file(os.path.join(directory, name))
            if not admission:
                state.pop("admission_counters", None)
                state.pop("admission_epoch", None)
            if namespaces is not None:
                state = self._renumber(state, namespaces, os.path.join(directory, name))
            if merged > 1 and "admission_counters" in state:
                c = state.pop("admission_counters")
                counters = c if counters is None else counters + c
                epoch = max(epoch, int(state.pop("admission_epoch")[0]))
            if keep is not None:
                mask = torch.from_numpy(keep(state["ids"].numpy()))
                for key in ("ids", "values", "frequency", "last_step", "namespace"):
                    if key in state:
                        state[key] = state[key][mask]
            self._import(state, embeddings_only, clear=False, first=k == 0 or "step" in state)
        if counters is not None and admission:
            self.native.set_admission_state(np.minimum(counters.numpy(), 2**32 - 1).astype(np.uint32), epoch)

    def load_state_dict(self, state: dict[str, torch.Tensor], embeddings_only: bool = False) -> None:
        """Replaces the table's contents with ``state`` (from ``state_dict``).
        ``embeddings_only`` (a warm start): keep the saved embeddings and
        metadata, and start this table's optimizer slots afresh."""
        self._import(state, embeddings_only, clear=True, first=True)

    def _import(self, state: dict, embeddings_only: bool, clear: bool, first: bool) -> None:
        missing = {"ids", "values", "frequency", "last_step"} - set(state)
        if missing:
            raise ValueError(f"table {self.name!r}: state is missing {sorted(missing)}")
        width = self.dim + self.native.slot_width
        values = state["values"]
        if embeddings_only:
            if values.dim() != 2 or values.shape[1] < self.dim:
                raise ValueError(
                    f"table {self.name!r}: state rows {tuple(values.shape)} hold no dim-{self.dim} embedding"
                )
            slots = torch.full((values.shape[0], self.native.slot_width), self._slot_init, dtype=torch.float32)
            values = torch.cat([values[:, : self.dim].to(torch.float32), slots], dim=1)
        if values.dim() != 2 or values.shape[1] != width:
            raise ValueError(
                f"table {self.name!r}: state rows have width {tuple(values.shape)[1:]} but this table's "
                f"rows are {width} wide (dim {self.dim} + {self.native.slot_width} optimizer slots); "
                "was it saved with another dim or optimizer?"
            )
        ids = ids_to_numpy(state["ids"], "state['ids']")
        values = values.to(torch.float32).contiguous().numpy()
        freq = state["frequency"].to(torch.int64).numpy().astype(np.uint32)
        last = state["last_step"].to(torch.int64).numpy().astype(np.uint32)
        ns = state.get("namespace")
        if ns is None and len(self.namespaces) > 1:
            raise ValueError(
                f"table {self.name!r}: holds {len(self.namespaces)} namespaces but the state has no 'namespace' "
                "column (saved from a table of one feature?)"
            )
        if ns is not None:
            ns = ns.to(torch.int64).numpy()
            bad = (ns < 0) | (ns >= len(self.namespaces))
            if bad.any():
                raise ValueError(
                    f"table {self.name!r}: state names namespace {int(ns[bad][0])}, but the table has "
                    f"{len(self.namespaces)} ({self.namespaces})"
                )
        if clear:
            self.native.clear()
        if ns is None:
            self.native.import_rows(ids, values, freq, last)
        else:
            for k in range(len(self.namespaces)):
                sel = np.flatnonzero(ns == k)
                if len(sel):
                    self.native.import_rows(ids[sel], values[sel], freq[sel], last[sel], k)
        if first and "admission_counters" in state:
            self.native.set_admission_state(
                state["admission_counters"].numpy().astype(np.uint32), int(state["admission_epoch"][0])
            )
        if first and "step" in state:
            self.step = int(state["step"][0]) if clear else max(self.step, int(state["step"][0]))

    def _renumber(self, state: dict, namespaces: dict[int, int], path: str) -> dict:
        """``state``'s rows of the saved namespaces ``namespaces`` maps, given
        this table's namespace indices; the others dropped."""
        n = len(state["ids"])
        saved = state.get("namespace")
        saved = torch.zeros(n, dtype=torch.int64) if saved is None else saved.to(torch.int64)
        if n and int(saved.min()) < 0:
            raise ValueError(f"table {self.name!r}: {path}: names namespace {int(saved.min())}")
        lut = torch.full((int(saved.max()) + 1 if n else 1,), -1, dtype=torch.int64)
        for theirs, mine in namespaces.items():
            if theirs < len(lut):
                lut[theirs] = mine
        mapped = lut[saved] if n else saved
        keep = mapped >= 0
        out = dict(state)
        for key in ("ids", "values", "frequency", "last_step"):
            out[key] = state[key][keep]
        if len(self.namespaces) > 1:
            out["namespace"] = mapped[keep]
        else:
            out.pop("namespace", None)
            if not bool((mapped[keep] == 0).all()):
                raise ValueError(f"table {self.name!r}: {path}: maps rows to a namespace this table lacks")
        return out


def lookup_gather(views: list, ids: list[np.ndarray], trainable: list[bool], missing_initial: list[bool]):
    """One native call (``recis_core::pipeline::lookup_gather``) for the
    lookups of ``views`` (``TableView``s: namespaces of physical tables),
    inserting where ``trainable``, and the gather of their distinct rows into
    one block: (block [U, D], inverse, each lookup's number of distinct
    rows, and (first, end, Ticket) for each run of trainable lookups of one
    physical table)."""
    block, inverse, _rows, sizes, runs = _native.lookup_gather_many(
        [v.table.native for v in views],
        ids,
        [v.table.step for v in views],
        trainable,
        [v.ns for v in views],
        missing_initial,
    )
    return block, inverse, sizes, runs


def concat(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(arrays) if len(arrays) > 1 else arrays[0]


class TableView:
    """One namespace of a ``HashTable`` seen as a table: the table of one
    feature (or one ``shared_name``) inside a coalesced table. Reads only;
    gradients, optimizer slots, eviction and checkpoints are the table's."""

    def __init__(self, table: HashTable, ns: int):
        self.table, self.ns = table, ns
        self.name = table.namespaces[ns]

    @property
    def dim(self) -> int:
        return self.table.dim

    @property
    def seed(self) -> int:
        return self.table.namespace_seeds[self.ns]

    def __len__(self) -> int:
        return self.table.native.len_in(self.ns)

    def __repr__(self) -> str:
        return f"TableView(name={self.name!r}, table={self.table.name!r}, dim={self.dim}, len={len(self)})"

    def lookup(self, ids: torch.Tensor) -> np.ndarray:
        return self.table.lookup(ids, self.ns)

    def embeddings(self, ids: torch.Tensor, missing: str = "zeros") -> torch.Tensor:
        return self.table.embeddings(ids, missing, self.ns)

    def initial_values(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table.initial_values(ids, self.ns)


class SharedBlock:
    """What several tables' pending lookups into one leaf ``W`` share: the
    group's lookup positions (``inverse``). torch's sparse gradients of
    ``embedding_bag``/``embedding`` hold one entry per position, in order;
    that lets a table take its entries as a slice. Checked once per block
    (``ordered``); if a torch version ever orders them otherwise, tables
    fall back to selecting their entries by row range."""

    def __init__(self, inverse: torch.Tensor):
        self.inverse = inverse
        self._ordered: bool | None = None

    def ordered(self, idx: torch.Tensor) -> bool:
        if self._ordered is None:
            self._ordered = idx.numel() == self.inverse.numel() and torch.equal(idx, self.inverse)
        return self._ordered


class RowsPart:
    """A table's share of a block ``w`` with a dense gradient: rows
    ``lo:hi`` of ``w``, row ``lo + k`` belonging to the table's pending row
    ``index[k]`` (several may belong to one row: an owner's lookups for
    several ranks, ``recis.distributed``)."""

    def __init__(self, lo: int, hi: int, index: torch.Tensor):
        self.lo, self.hi, self.index = lo, hi, index


def part_gradient(w: torch.Tensor, part) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(index into the part's rows, gradient rows) of a table's share of a
    shared block ``w``; None if ``w`` got no gradient."""
    g = w.grad
    if g is None:
        return None
    if isinstance(part, RowsPart):
        return part.index, g[part.lo : part.hi]
    block, lo, hi, plo, phi = part
    if not g.is_sparse:
        return torch.arange(hi - lo), g[lo:hi]
    idx, vals = g._indices()[0], g._values()
    if block.ordered(idx):
        return idx[plo:phi] - lo, vals[plo:phi]
    mask = (idx >= lo) & (idx < hi)
    return idx[mask] - lo, vals[mask]
