"""Row-wise sharded training over torch.distributed.

``torchrun`` starts the processes and torch.distributed (gloo on CPU) carries
the traffic. Every sparse table is sharded by rows: the owner of an id is
``owner_of(id, world)``, a fixed hash of the id modulo the world size, and
each rank's ``HashTable`` holds only the ids it owns. A step of an
``EmbeddingEngine`` group:

1. each rank reduces its batch's ids to distinct ids with their counts;
2. one all-to-all sends every distinct id (and its count) to its owner;
3. the owner looks them up in one native call (inserting new ones, with the
   counts, so frequencies and admission see what one process would have
   seen), gathers their rows and sends them back in one all-to-all;
4. backward: each rank merges its gradient by distinct id, scales it by
   ``1 / world`` (DistributedDataParallel averages dense gradients the same
   way) and sends it to the owner in one all-to-all, where it waits, with
   the gradients of other ranks and micro-batches, for the sparse optimizer.

Dense parameters are identical on every rank: ``broadcast_dense`` copies
rank 0's at the start and ``average_dense_gradients`` all-reduces their
gradients before the dense optimizer steps (one flat buffer; no
``DistributedDataParallel`` wrapper, so the model and its checkpoint keys
stay the user's). Trained this way, ``world`` ranks with batches of ``B``
follow one process with batches of ``world * B`` (the rows of the ranks'
batches, concatenated), to float rounding (``tests/test_distributed.py``).
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.distributed as dist

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def active() -> bool:
    """True inside a process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def init_from_env(backend: str = "gloo") -> bool:
    """Joins the process group ``torchrun`` describes (``WORLD_SIZE`` > 1 in
    the environment); False when run as one process."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return False
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return True


def owner_of(ids: np.ndarray, world_size: int) -> np.ndarray:
    """The rank that owns each id: Fibonacci hashing of the 64-bit id, then
    ``% world_size`` (so consecutive ids spread over the ranks). Stable: a
    checkpoint reloaded into another world size is re-sharded with it."""
    if world_size == 1:
        return np.zeros(len(ids), dtype=np.int64)
    h = (ids.view(np.uint64) * _GOLDEN) >> np.uint64(32)
    return (h % np.uint64(world_size)).astype(np.int64)


def all_true(flag: bool) -> bool:
    """True on every rank iff ``flag`` is True on every rank."""
    if not active():
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def sum_floats(values: list[float]) -> list[float]:
    """Element-wise sums of ``values`` over the ranks."""
    if not active():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def barrier() -> None:
    if active():
        dist.barrier()


def broadcast_dense(module: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank."""
    if not active():
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, 0)


def average_dense_gradients(params) -> None:
    """Replaces each gradient by its mean over the ranks (one all-reduce of
    one flat buffer). A parameter without a gradient on this rank counts as
    zero; every rank must hold the same parameters."""
    if not active():
        return
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).to(torch.float32) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    at = 0
    for p, g in zip(params, grads, strict=True):
        n = g.numel()
        p.grad = flat[at : at + n].view_as(g).to(g.dtype)
        at += n


def gather_arrays(arrays: list[np.ndarray]) -> list[np.ndarray]:
    """Each array concatenated over the ranks (rank order). The arrays may
    differ in length between ranks; each keeps its dtype."""
    if not active():
        return arrays
    n = world()
    sizes = torch.tensor([len(a) for a in arrays], dtype=torch.int64)
    all_sizes = [torch.empty_like(sizes) for _ in range(n)]
    dist.all_gather(all_sizes, sizes)
    out = []
    for k, a in enumerate(arrays):
        longest = max(int(s[k]) for s in all_sizes)
        t = torch.zeros(longest, dtype=torch.from_numpy(a[:0]).dtype)
        t[: len(a)] = torch.from_numpy(np.ascontiguousarray(a))
        parts = [torch.empty_like(t) for _ in range(n)]
        dist.all_gather(parts, t)
        out.append(np.concatenate([p[: int(s[k])].numpy() for p, s in zip(parts, all_sizes, strict=True)]))
    return out


def all_to_all(send: torch.Tensor, send_sizes: list[int], recv_sizes: list[int]) -> torch.Tensor:
    """Rows ``send`` split by ``send_sizes`` (one part per rank, in rank
    order) swapped for the parts of the other ranks, ``recv_sizes`` rows
    from each."""
    recv = send.new_empty((sum(recv_sizes), *send.shape[1:]))
    dist.all_to_all_single(recv, send.contiguous(), recv_sizes, send_sizes)
    return recv


__all__ = [
    "active",
    "all_to_all",
    "all_true",
    "average_dense_gradients",
    "barrier",
    "broadcast_dense",
    "gather_arrays",
    "init_from_env",
    "owner_of",
    "rank",
    "sum_floats",
    "world",
]
