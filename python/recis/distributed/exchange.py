"""One ``EmbeddingEngine`` group's lookup across the ranks, and its
gradient's way back (see ``recis.distributed``)."""

from __future__ import annotations

import numpy as np
import torch

from recis import _native
from recis.distributed import all_to_all, owner_of, world
from recis.nn.backend import apply_arrived
from recis.nn.hash_table import RowsPart, lookup_gather


class _Plan:
    """Where a group's distinct ids went, to send their gradient back the
    same way. ``order``: the send order of the requester's distinct ids;
    ``recv_perm``: the owner's received entries in table-major order;
    ``holder``: the owner's gathered rows, whose ``.grad`` the backward
    fills for the tables' pending lookups."""

    def __init__(self, order, send_sizes, recv_sizes, recv_perm, holder, n_unique, dim, tables):
        self.order = order
        self.send_sizes = send_sizes
        self.recv_sizes = recv_sizes
        self.recv_perm = recv_perm
        self.holder = holder
        self.n_unique = n_unique
        self.dim = dim
        # The owner's physical tables with pending lookups into ``holder``.
        self.tables = tables

    def send_gradient(self, grad: torch.Tensor) -> None:
        if grad.is_sparse:
            dense = torch.zeros(self.n_unique, self.dim, dtype=grad.dtype)
            dense.index_add_(0, grad._indices()[0], grad._values())
        else:
            dense = grad
        # Mean over the ranks, as the dense gradients (one process with the
        # ranks' batches concatenated would see this gradient).
        send = dense[self.order] / world()
        recv = all_to_all(send.float(), self.send_sizes, self.recv_sizes)
        got = recv[self.recv_perm]
        h = self.holder
        h.grad = got if h.grad is None else h.grad + got
        if any(t.in_backward is not None for t in self.tables):
            # Optimizer in backward: the owner applies it on arrival.
            apply_arrived(h, self.tables)


class _FromOwners(torch.autograd.Function):
    @staticmethod
    def forward(ctx, anchor, w, plan):  # noqa: ARG004 - anchor only ties w into the graph
        ctx.plan = plan
        return w  # the same storage, no copy: autograd wraps it as an output

    @staticmethod
    def backward(ctx, grad):
        ctx.plan.send_gradient(grad)
        return None, None, None


def sharded_lookup(tables, ids: list[np.ndarray], trainable: list[bool], missing_initial: list[bool]):
    """(W [U, D], inverse) for a group's logical ``tables`` (``TableView``s:
    namespaces of physical tables) as ``EmbeddingEngine`` builds them in one
    process: W holds each table's distinct ids of this rank's batch, table
    after table, and ``inverse`` maps every id to its row of W. Every rank
    must call this for the same group at the same point of its step."""
    n, T, dim = world(), len(tables), tables[0].dim
    # Distinct ids of every table at once, the tables in parallel (Rust).
    distinct = _native.distinct_many(ids)
    uniq = [u for u, _, _ in distinct]
    inverses = [torch.from_numpy(inv) for _, inv, _ in distinct]
    counts = [c for _, _, c in distinct]
    sizes = [len(u) for u in uniq]
    all_ids = np.concatenate(uniq) if T > 1 else uniq[0]
    all_counts = np.concatenate(counts) if T > 1 else counts[0]
    table_of = np.repeat(np.arange(T, dtype=np.int64), sizes)
    key = owner_of(all_ids, n) * T + table_of
    order = np.argsort(key, kind="stable")
    matrix = np.bincount(key, minlength=n * T).astype(np.int64)
    recv_matrix = all_to_all(torch.from_numpy(matrix), [T] * n, [T] * n).numpy().reshape(n, T)
    send_sizes = matrix.reshape(n, T).sum(1).tolist()
    recv_sizes = recv_matrix.sum(1).tolist()
    payload = torch.from_numpy(np.stack([all_ids[order], all_counts[order]], 1))
    got = all_to_all(payload, send_sizes, recv_sizes).numpy()

    # Owner: the entries arrived by source rank, then table; take them
    # table by table.
    recv_table = np.repeat(np.tile(np.arange(T, dtype=np.int64), n), recv_matrix.reshape(-1))
    recv_perm = np.argsort(recv_table, kind="stable")
    by_table = got[recv_perm]
    bounds = np.concatenate([[0], np.cumsum(recv_matrix.sum(0))])
    r_ids = [np.ascontiguousarray(by_table[bounds[j] : bounds[j + 1], 0]) for j in range(T)]
    r_cnt = [by_table[bounds[j] : bounds[j + 1], 1] for j in range(T)]
    # Each id as many times as the batches held it: frequencies and the
    # admission sketch count what one process would have counted.
    look = [np.repeat(i, c) if tr else i for i, c, tr in zip(r_ids, r_cnt, trainable, strict=True)]
    # One native call: every table's lookup and the gather of its distinct
    # rows into one block, under one lock per physical table.
    block, block_inv, block_sizes, runs = lookup_gather(tables, look, trainable, missing_initial)
    # Each received entry's row of the block: its first position in `look`.
    starts = np.concatenate([[0], np.cumsum([len(x) for x in look])])
    firsts = [
        starts[j] + (np.cumsum(r_cnt[j]) - r_cnt[j] if tr else np.arange(len(r_ids[j])))
        for j, tr in enumerate(trainable)
    ]
    entry_rows = block_inv[np.concatenate(firsts)] if T > 1 else block_inv[firsts[0]]
    values = torch.from_numpy(block)[torch.from_numpy(entry_rows)]
    # The entries of ids that came from several ranks point at the same
    # distinct row (the optimizer sums them). A run's rows are the ticket's,
    # block rows lo[a]:lo[b].
    lo = np.concatenate([[0], np.cumsum(block_sizes)])
    owners = []
    for a, b, ticket in runs:
        ea, eb = int(bounds[a]), int(bounds[b])
        index = torch.from_numpy(entry_rows[ea:eb] - lo[a])
        tables[a].table.add_pending(ticket, values, RowsPart(ea, eb, index))
        if all(tables[a].table is not t for t in owners):
            owners.append(tables[a].table)
    back = torch.empty_like(values)
    back[torch.from_numpy(recv_perm)] = values
    mine = all_to_all(back, recv_sizes, send_sizes)
    w = torch.empty(sum(sizes), dim)
    w[torch.from_numpy(order)] = mine

    inverse, lo = [], 0
    for inv, s in zip(inverses, sizes, strict=True):
        inverse.append(inv + lo if lo else inv)
        lo += s
    inverse = torch.cat(inverse) if T > 1 else inverse[0]
    if any(trainable):
        plan = _Plan(
            torch.from_numpy(order), send_sizes, recv_sizes, torch.from_numpy(recv_perm), values, len(w), dim, owners
        )
        w = _FromOwners.apply(torch.zeros((), requires_grad=True), w, plan)
    return w, inverse
