"""Gradient clipping over dense and sparse gradients together, and LR
schedules with warm-up for any optimizer (dense or sparse).

``clip_grad_norm_`` is ``torch.nn.utils.clip_grad_norm_`` (L2) extended to
the gradients of the hash tables' pending lookups: one norm over both, one
coefficient for both. ``warmup_schedule`` is a ``torch.optim.lr_scheduler
.LambdaLR``, so it drives a ``SparseOptimizer``'s ``param_groups`` as it
drives a dense optimizer's; ``Schedulers`` steps several as one (the Trainer
takes a list)."""

from __future__ import annotations

import math

import torch

from recis import distributed

SCHEDULES = ("constant", "linear", "cosine")


def _sparse_grads(sparse_optimizers) -> list[torch.Tensor]:
    """The pending gradients of the optimizers' tables (dense, or sparse
    COO), each lookup block once."""
    seen: set[int] = set()
    out = []
    for opt in sparse_optimizers:
        if getattr(opt, "_in_backward", False):
            raise RuntimeError(
                f"clip_grad_norm_: {type(opt).__name__} updates its tables inside backward (in_backward=True), so "
                "no sparse gradient is left to clip; clipping needs in_backward=False (the Trainer chooses it)"
            )
        for t in opt.tables.values():
            for w in t.pending_leaves():
                if id(w) in seen or w.grad is None:
                    continue
                seen.add(id(w))
                out.append(w.grad)
    return out


def _sq(g: torch.Tensor) -> float:
    # A sparse gradient may hold a row once per occurrence: its norm is
    # that of the rows' sums (coalesced), as torch's dense gradient's.
    v = g.coalesce()._values() if g.is_sparse else g
    return float(torch.sum(v.double() ** 2))


@torch.no_grad()
def clip_grad_norm_(max_norm: float, parameters=(), sparse_optimizers=(), error_if_nonfinite: bool = False):
    """Scales the gradients of ``parameters`` (dense) and of the pending
    lookups of ``sparse_optimizers`` (the tables' rows) so that their
    joint L2 norm is at most ``max_norm``; returns the norm before clipping
    (a float). As ``torch.nn.utils.clip_grad_norm_``: the coefficient is
    ``max_norm / (norm + 1e-6)``, clamped to 1; a non-finite norm leaves
    the gradients as they are (and raises with ``error_if_nonfinite``).

    Call it between ``backward()`` and the optimizers' ``step()``, after
    unscaling (fp16 loss scaling). A row read by two lookups of one step has
    a gradient in each; the norm counts their sum only when one lookup
    reads it (the engine coalesces a step's lookups of a table into one).
    Under torchrun, call it on every rank after the dense gradients are
    averaged: the sparse part is summed over the ranks (each rank's
    gradients of its own lookups), so every rank applies one coefficient."""
    if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) or not max_norm > 0:
        raise ValueError(f"clip_grad_norm_: max_norm must be a number > 0, got {max_norm!r}")
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    dense = [p.grad for p in parameters if p.grad is not None]
    sparse = _sparse_grads(sparse_optimizers)
    sq_dense = sum(_sq(g) for g in dense)
    sq_sparse = sum(_sq(g) for g in sparse)
    if distributed.active():
        (sq_sparse,) = distributed.sum_floats([sq_sparse])
    total = math.sqrt(sq_dense + sq_sparse)
    if not math.isfinite(total):
        if error_if_nonfinite:
            raise RuntimeError(f"clip_grad_norm_: the gradients' norm is {total} (a NaN or inf gradient)")
        return total
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        for g in dense + sparse:
            (g._values() if g.is_sparse else g).mul_(coef)
    return total


def warmup_schedule(
    optimizer,
    warmup_steps: int = 0,
    decay: str = "constant",
    total_steps: int | None = None,
    min_lr_ratio: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` of ``optimizer`` (dense, or a ``SparseOptimizer``):
    the LR rises linearly over ``warmup_steps`` (step s < warmup_steps runs at
    ``(s + 1) / warmup_steps`` of the base LR), then ``decay``: "constant",
    or "linear" / "cosine" from the base LR down to ``min_lr_ratio`` of it
    at ``total_steps`` (and stays there). Call its ``step()`` once an
    optimizer step, as the Trainer does."""
    if decay not in SCHEDULES:
        raise ValueError(f"warmup_schedule: decay {decay!r} is not one of {list(SCHEDULES)}")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"warmup_schedule: warmup_steps must be an int >= 0, got {warmup_steps!r}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"warmup_schedule: min_lr_ratio must be in [0, 1], got {min_lr_ratio!r}")
    if decay != "constant":
        if not isinstance(total_steps, int) or total_steps <= warmup_steps:
            raise ValueError(
                f"warmup_schedule: decay {decay!r} needs total_steps > warmup_steps ({warmup_steps}), got "
                f"{total_steps!r}"
            )

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if decay == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
        shape = 1.0 - progress if decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
        return min_lr_ratio + (1.0 - min_lr_ratio) * shape

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class Schedulers:
    """Several LR schedulers stepped as one (e.g. one for the dense
    optimizer, one for the sparse one); ``state_dict`` is JSON (each
    scheduler's, in order)."""

    def __init__(self, schedulers):
        self.schedulers = list(schedulers)

    def step(self) -> None:
        for s in self.schedulers:
            s.step()

    def get_last_lr(self) -> list[float]:
        return [lr for s in self.schedulers for lr in s.get_last_lr()]

    def state_dict(self) -> dict:
        return {"schedulers": [s.state_dict() for s in self.schedulers]}

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("schedulers") if isinstance(state, dict) else None
        if not isinstance(saved, list) or len(saved) != len(self.schedulers):
            n = len(saved) if isinstance(saved, list) else "no"
            raise ValueError(f"Schedulers: the state holds {n} schedulers, this run has {len(self.schedulers)}")
        for s, st in zip(self.schedulers, saved, strict=True):
            s.load_state_dict(st)
