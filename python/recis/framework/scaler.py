"""Dynamic loss scaling for fp16 training, dense and sparse.

``torch.amp.GradScaler`` unscales and checks the gradients of dense
optimizers only; the gradients of dynamic tables live in the lookups' leaf
tensors, which a ``SparseOptimizer`` applies. This scaler does both with
GradScaler's rule: multiply the loss by ``scale`` before backward; before
the optimizer step divide every gradient (dense and sparse) by it; if any is
inf/NaN, skip the step and multiply ``scale`` by ``backoff_factor``; after
``growth_interval`` good steps in a row, multiply it by ``growth_factor``.
Scales are powers of two, so scaling is exact.
"""

from __future__ import annotations

import torch


class DynamicLossScaler:
    def __init__(
        self,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
    ):
        if init_scale <= 0 or growth_factor <= 1 or not 0 < backoff_factor < 1 or growth_interval < 1:
            raise ValueError(
                "DynamicLossScaler: need init_scale > 0, growth_factor > 1, 0 < backoff < 1, interval >= 1"
            )
        self.scale = float(init_scale)
        self.growth_factor = growth_factor
        self.backoff_factor = backoff_factor
        self.growth_interval = growth_interval
        self.good_steps = 0
        self.skipped = 0

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale

    @torch.no_grad()
    def unscale(self, dense_optimizer=None, sparse_optimizer=None) -> bool:
        """Divides every pending gradient by the scale; True if all are finite."""
        inv = 1.0 / self.scale
        finite = True
        if dense_optimizer is not None:
            for group in dense_optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        g = p.grad._values() if p.grad.is_sparse else p.grad
                        g.mul_(inv)
                        finite &= bool(torch.isfinite(g).all())
        if sparse_optimizer is not None:
            finite &= sparse_optimizer.unscale_(inv)
        return finite

    def update(self, finite: bool) -> None:
        if finite:
            self.good_steps += 1
            if self.good_steps == self.growth_interval:
                self.scale *= self.growth_factor
                self.good_steps = 0
        else:
            self.scale *= self.backoff_factor
            self.good_steps = 0
            self.skipped += 1

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps, "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self.good_steps = int(state["good_steps"])
        self.skipped = int(state.get("skipped", 0))
