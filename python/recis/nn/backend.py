"""The sparse path's one interface: where a group's lookups go, and where
their gradient goes back.

A *group* is what ``EmbeddingEngine`` looks up together: features pooled
the same way, as batches of ids of one or several logical tables
(``TableView``s: namespaces of physical tables). A backend turns them into
a ``Block``: ``w`` [U, D], every distinct row the group reads, table after
table, and ``inverse``, the row of ``w`` each id position reads. Pooling
then runs on ``w`` (``recis.nn.dynamic_embedding``), the same whatever the
backend. The backend owns what happens to ``w``'s gradient:

- ``LocalBackend``: this process holds every table. One native call looks
  the ids up (inserting new ones when training) and gathers their rows
  (``recis_core::pipeline::lookup_gather``); the rows' tickets wait in
  their tables for the sparse optimizer, or — optimizer in backward — are
  updated as soon as the gradient arrives.
- ``ShardedBackend``: under ``torchrun`` the tables are sharded by rows over
  the ranks; the same native call runs on each owner, between two
  all-to-alls (``recis.distributed.exchange``). The gradient goes back to
  the owners, where it waits for the optimizer or is applied on arrival.
- The GPU device cache (``cuda/``) is to be the third.

Which one a module uses is decided once, by ``default_backend()`` when the
module first looks something up; modules carry no branches on the process
group.

Optimizer in backward (``SparseOptimizer(..., in_backward=True)``): a
trainable lookup of a table whose optimizer updates in backward gets, on
the local backend, a ``FusedUpdate``: the pooling's backward hands it the
pooled gradient and the update runs from there in one native call
(``recis_core::pipeline::apply_pooled``), with no gradient tensor for
``w``. Where pooling cannot fuse (sequences, torch's ``embedding_bag``
fallback, a block shared with deferred tables, the sharded backend), the
update runs when ``w``'s gradient has accumulated
(``apply_arrived``), still inside ``backward``. A table waits for every one
of its pending lookups: one whose output never reaches the loss defers the
table's update to ``step``. Under ``torchrun`` an update refused inside
backward (a non-finite gradient) raises on the owner in the middle of the
backward's all-to-alls; torchrun then stops the other ranks (with the
deferred update it raises after them, at ``step``).
"""

from __future__ import annotations

import numpy as np
import torch

from recis import _native, distributed
from recis.nn.hash_table import SharedBlock, lookup_gather


class Block:
    """A group's looked-up rows: ``w`` [U, D] (a leaf that requires grad,
    or an autograd output tied to the owners, when training), ``inverse``
    (int64, one row of ``w`` per id position, the group's positions table
    after table) and ``fused``: what the pooling's backward may hand the
    pooled gradient to (None: none)."""

    __slots__ = ("fused", "inverse", "w")

    def __init__(self, w: torch.Tensor, inverse: torch.Tensor, fused=None):
        self.w, self.inverse, self.fused = w, inverse, fused


class SparseBackend:
    """Base class: ``lookup`` is the whole interface, with ``shards``: over
    how many processes the tables' rows are spread (a row cap such as
    ``EvictionOption.max_rows`` is shared among them)."""

    name = ""
    shards = 1

    def lookup(self, views: list, ids: list[np.ndarray], trainable: list[bool], missing_initial: list[bool]) -> Block:
        """The group's block. ``ids[k]``: int64 ids of ``views[k]``;
        ``trainable[k]``: insert new ids and record the lookup for the
        optimizer; ``missing_initial[k]``: an id without a row reads its
        initial value (else zeros). Every view has the same dim."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class LocalBackend(SparseBackend):
    """Every table in this process."""

    name = "local"

    def lookup(self, views, ids, trainable, missing_initial) -> Block:
        block, inverse, sizes, runs = lookup_gather(views, ids, trainable, missing_initial)
        w, inverse = torch.from_numpy(block), torch.from_numpy(inverse)
        if not any(trainable):
            return Block(w, inverse)
        w.requires_grad_(True)
        shared = SharedBlock(inverse)
        # Where each lookup's rows of W and positions start.
        lo = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        plo = np.concatenate([[0], np.cumsum([len(x) for x in ids])]).astype(np.int64)
        tables, parts = [], []
        # One ticket for each run of trainable lookups of one physical
        # table: its rows are W's rows lo[a]:lo[b], its positions
        # plo[a]:plo[b].
        for a, b, ticket in runs:
            table = views[a].table
            part = (shared, int(lo[a]), int(lo[b]), int(plo[a]), int(plo[b]))
            table.add_pending(ticket, w, part)
            parts.append((table, ticket, part))
            if all(table is not t for t in tables):
                tables.append(table)
        fused = None
        if any(t.in_backward is not None for t in tables):
            w.register_post_accumulate_grad_hook(lambda leaf: apply_arrived(leaf, tables))
            fused = FusedUpdate(w, tables, parts)
        return Block(w, inverse, fused)


class ShardedBackend(SparseBackend):
    """Tables sharded by rows over the ranks of the process group."""

    name = "sharded"

    @property
    def shards(self) -> int:
        return distributed.world()

    def lookup(self, views, ids, trainable, missing_initial) -> Block:
        from recis.distributed.exchange import sharded_lookup

        w, inverse = sharded_lookup(views, ids, trainable, missing_initial)
        return Block(w, inverse)


def row_shards() -> int:
    """Over how many processes this process's tables are sharded (1: local)."""
    return default_backend().shards


def default_backend() -> SparseBackend:
    """The backend for this process: sharded inside a process group of more
    than one rank, else local."""
    return ShardedBackend() if distributed.active() else LocalBackend()


def apply_arrived(leaf: torch.Tensor, tables: list) -> None:
    """Optimizer in backward, now that ``leaf``'s gradient has arrived: the
    update of each of ``tables`` whose optimizer updates in backward and
    whose pending lookups all have their gradient (a table read by several
    blocks of one step waits for the last, so that each row gets one
    update, as torch's would). The gradients it consumed are dropped (a
    leaf keeps its gradient while a table still waits for it). A gradient
    that arrives when no table waits for it (a second backward through
    lookups already applied) is an error: it would be lost."""
    if leaf.grad is None:
        return  # nothing arrived (the fused update took the pooled gradient)
    if not any(t.waits_for(leaf) for t in tables):
        raise RuntimeError(
            "in_backward: a gradient arrived for lookups whose update already ran in backward (a second backward "
            "through the same forward); it cannot be applied: use in_backward=False to accumulate gradients"
        )
    by_opt: dict[int, tuple] = {}
    for t in tables:
        if t.in_backward is not None and t.all_arrived():
            by_opt.setdefault(id(t.in_backward), (t.in_backward, []))[1].append(t)
    taken = [leaf]
    try:
        for opt, ts in by_opt.values():
            taken.extend(opt.apply_in_backward(ts))
    finally:
        waiting = [w for t in tables for w in t.pending_leaves()]
        for w in taken:
            if all(w is not x for x in waiting):
                w.grad = None


class FusedUpdate:
    """What the pooling's backward hands the pooled gradient to when every
    table reading ``w`` updates in backward: the gradient of each row and
    the optimizer update, in one native call, with no gradient of ``w``."""

    def __init__(self, w: torch.Tensor, tables: list, parts: list):
        self.w, self.tables, self.parts = w, tables, parts

    def ready(self) -> bool:
        """True when the pooled gradient may go straight to the tables:
        every table reading ``w`` updates in backward and waits for ``w``
        alone (a table that waits for other blocks too is updated once
        they have all arrived, through ``w``'s gradient)."""
        return all(t.in_backward is not None and t.only_reads(self.w) for t in self.tables)

    def apply(self, grad: torch.Tensor, inverse, offsets, weights, mean: bool, features: int) -> None:
        """One native call (``recis_core::pipeline::apply_pooled``) for every
        table's share of ``w``: each row's gradient summed from ``grad`` (the
        pooled output's, [B, features, D]) in the core, and its update.
        Raises ValueError naming the first table that refused (it is
        unchanged); the others are updated."""
        targets = [t.in_backward.fused_target(t) for t, _ticket, _part in self.parts]
        for t in self.tables:
            t.take_pending()
        errors = _native.apply_pooled(
            grad.numpy(),
            inverse.numpy(),
            offsets.numpy(),
            None if weights is None else weights.numpy(),
            mean,
            features,
            self.w.shape[0],
            [t.native for t, _ticket, _part in self.parts],
            [ticket for _t, ticket, _part in self.parts],
            [k for k, _lr, _step, _done in targets],
            [lr for _k, lr, _step, _done in targets],
            [step for _k, _lr, step, _done in targets],
        )
        failed = None
        for (t, _ticket, _part), (_k, _lr, _step, done), err in zip(self.parts, targets, errors, strict=True):
            if err is None:
                done()
            elif failed is None:
                failed = f"table {t.name!r}: {err}"
        if failed is not None:
            raise ValueError(failed)


__all__ = ["Block", "FusedUpdate", "LocalBackend", "ShardedBackend", "SparseBackend", "default_backend"]
