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

A rank that hangs does not hang the job: every collective times out after
``collective_timeout`` seconds (``init_from_env``; 300 by default, or
``$RECIS_COLLECTIVE_TIMEOUT``), and while ``watch`` runs (the Trainer's
``train``) a heartbeat names the rank that went silent and ends every rank
(``recis.distributed.watchdog``).
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)

DEFAULT_TIMEOUT_S = 300.0
TIMEOUT_ENV = "RECIS_COLLECTIVE_TIMEOUT"
# The timeout the process group was made with (init_from_env), for watch().
_group_timeout: float | None = None
# Collectives this process has entered, and since when (monotonic) it is in
# the current one: the watchdog's measure of progress.
_entered = 0
_inside_since: float | None = None


def active() -> bool:
    """True inside a process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def collective_timeout(seconds: float | None = None) -> float:
    """``seconds`` if given, else ``$RECIS_COLLECTIVE_TIMEOUT``, else 300
    (five minutes: longer than a checkpoint save of tables of some GB, short
    enough that a hung job frees its machines)."""
    if seconds is None:
        raw = os.environ.get(TIMEOUT_ENV, "")
        try:
            seconds = float(raw) if raw else DEFAULT_TIMEOUT_S
        except ValueError:
            raise ValueError(f"${TIMEOUT_ENV}={raw!r}: expected seconds (a number)") from None
    if not seconds > 0:
        raise ValueError(f"collective timeout must be > 0 seconds, got {seconds!r}")
    return float(seconds)


def init_from_env(backend: str = "gloo", timeout: float | None = None) -> bool:
    """Joins the process group ``torchrun`` describes (``WORLD_SIZE`` > 1 in
    the environment); False when run as one process. ``timeout``: seconds a
    collective waits for the other ranks before it raises
    (``collective_timeout``)."""
    global _group_timeout
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return False
    if not dist.is_initialized():
        _group_timeout = collective_timeout(timeout)
        dist.init_process_group(backend, timeout=timedelta(seconds=_group_timeout))
    return True


@contextmanager
def _collective():
    """Marks the main thread inside a collective, for the watchdog."""
    global _entered, _inside_since
    _entered += 1
    _inside_since = time.monotonic()
    try:
        yield
    finally:
        _inside_since = None


def _collectives() -> tuple[int, float | None]:
    return _entered, _inside_since


class _Unwatched:
    """``watch`` in one process: nothing to beat to."""

    def beat(self, step: int) -> None:
        pass


@contextmanager
def watch(timeout: float | None = None, last_checkpoint=None, step: int = 0):
    """While the block runs, a heartbeat with the other ranks: if one goes
    silent (or a collective raises a timeout), this rank writes who is at
    fault on stderr and exits with ``watchdog.EXIT_HUNG`` (see
    ``recis.distributed.watchdog``). Yields an object whose ``beat(step)``
    the loop calls as it completes each step. ``timeout``: seconds (None:
    the one ``init_from_env`` gave the process group, else
    ``collective_timeout()``); ``last_checkpoint``: a
    function naming the checkpoint to resume from. Nothing is watched when
    run as one process.

    Example::

        with distributed.watch() as heart:
            for step, batch in enumerate(batches, 1):
                ...  # forward, backward, optimizer step
                heart.beat(step)
    """
    if not active():
        yield _Unwatched()
        return
    from recis.distributed.watchdog import Watchdog

    seconds = timeout if timeout is not None else _group_timeout
    dog = Watchdog(collective_timeout(seconds), rank(), world(), _collectives, last_checkpoint, step).start()
    try:
        yield dog
    except Exception as e:
        if Watchdog.is_peer_error(e):
            dog.fail(e)
        raise
    finally:
        dog.stop()


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
    with _collective():
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def sum_floats(values: list[float]) -> list[float]:
    """Element-wise sums of ``values`` over the ranks."""
    if not active():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    with _collective():
        dist.all_reduce(t)
    return t.tolist()


def barrier() -> None:
    if active():
        with _collective():
            dist.barrier()


def broadcast_dense(module: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank."""
    if not active():
        return
    with torch.no_grad(), _collective():
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
    with _collective():
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
    with _collective():
        dist.all_gather(all_sizes, sizes)
    out = []
    for k, a in enumerate(arrays):
        longest = max(int(s[k]) for s in all_sizes)
        t = torch.zeros(longest, dtype=torch.from_numpy(a[:0]).dtype)
        t[: len(a)] = torch.from_numpy(np.ascontiguousarray(a))
        parts = [torch.empty_like(t) for _ in range(n)]
        with _collective():
            dist.all_gather(parts, t)
        out.append(np.concatenate([p[: int(s[k])].numpy() for p, s in zip(parts, all_sizes, strict=True)]))
    return out


def all_to_all(send: torch.Tensor, send_sizes: list[int], recv_sizes: list[int]) -> torch.Tensor:
    """Rows ``send`` split by ``send_sizes`` (one part per rank, in rank
    order) swapped for the parts of the other ranks, ``recv_sizes`` rows
    from each."""
    recv = send.new_empty((sum(recv_sizes), *send.shape[1:]))
    with _collective():
        dist.all_to_all_single(recv, send.contiguous(), recv_sizes, send_sizes)
    return recv


__all__ = [
    "active",
    "all_to_all",
    "all_true",
    "average_dense_gradients",
    "barrier",
    "broadcast_dense",
    "collective_timeout",
    "gather_arrays",
    "init_from_env",
    "owner_of",
    "rank",
    "sum_floats",
    "watch",
    "world",
]
