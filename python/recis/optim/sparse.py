"""Sparse optimizers for RecIS hash tables.

They are ``torch.optim.Optimizer`` subclasses, so LR schedulers, ``param_groups``,
``state_dict``/``load_state_dict`` and ``zero_grad`` work as users expect. The
arithmetic is one fused Rust call per table and step (``recis-core`` optim):
gradients of the same row — from several lookups or accumulation
micro-steps — are summed first, then the row and its slots are updated in
place. Optimizer slots live in the table's rows (and in its checkpoints).

Each group holds one zero-size placeholder tensor per table (torch's optimizer
machinery requires tensors); the table behind it is kept in ``self.tables``.
"""

from __future__ import annotations

import torch
from torch import nn

from recis import _native
from recis.nn.hash_table import HashTable


def collect_tables(params) -> list[HashTable]:
    """Tables from HashTables, modules holding them (``DynamicEmbedding``,
    ``EmbeddingEngine``, any ``nn.Module``), or iterables of these."""
    if isinstance(params, HashTable):
        return [params]
    if isinstance(params, nn.Module):
        found: list[HashTable] = []
        for m in params.modules():
            tables = getattr(m, "tables", None)
            if callable(tables):
                for t in tables():
                    if all(t is not f for f in found):
                        found.append(t)
        return found
    if isinstance(params, (str, bytes, dict)) or not hasattr(params, "__iter__"):
        raise TypeError(
            f"expected hash tables, modules holding them or iterables of these, got {type(params).__name__}"
        )
    out: list[HashTable] = []
    for p in params:
        for t in collect_tables(p):
            if all(t is not f for f in out):
                out.append(t)
    return out


class SparseOptimizer(torch.optim.Optimizer):
    """Base class: subclasses name their kernel and hyper-parameters."""

    kind = ""

    def __init__(self, tables, defaults: dict, in_backward: bool | None = None):
        # Torch-style param groups: a list of dicts whose "params" are
        # tables or modules holding them; other keys override the defaults.
        specs = list(tables) if isinstance(tables, (list, tuple)) else None
        grouped = bool(specs) and all(isinstance(g, dict) for g in specs)
        if specs and not grouped and any(isinstance(g, dict) for g in specs):
            raise TypeError(f"{type(self).__name__}: mix of param-group dicts and tables")
        if grouped and any("params" not in g for g in specs):
            raise ValueError(f"{type(self).__name__}: every param group needs 'params'")
        groups = (
            [{**g, "params": collect_tables(g["params"])} for g in specs]
            if grouped
            else [{"params": collect_tables(tables)}]
        )
        if not any(g["params"] for g in groups):
            raise ValueError(f"{type(self).__name__}: no hash tables to optimize")
        seen: list[HashTable] = []
        for g in groups:
            for t in g["params"]:
                if any(t is s for s in seen):
                    raise ValueError(f"{type(self).__name__}: table {t.name!r} is in more than one param group")
                seen.append(t)
        self.tables: dict[int, HashTable] = {}
        param_groups = []
        for g in groups:
            placeholders = []
            for t in g["params"]:
                ph = torch.zeros(0, requires_grad=True)
                self.tables[id(ph)] = t
                placeholders.append(ph)
            param_groups.append({**g, "params": placeholders})
        self._kernels: dict[tuple, _native.SparseOptimizerKernel] = {}
        super().__init__(param_groups, defaults)
        for group in self.param_groups:
            _check_lr(group["lr"])
        for group in self.param_groups:
            kernel = self._kernel(group)
            for p in group["params"]:
                self.tables[id(p)].attach_optimizer(kernel, self.kind)
        # Placeholders whose table was updated in backward since the last step.
        self._updated: set[int] = set()
        if in_backward is not None and not isinstance(in_backward, bool):
            raise TypeError(f"{type(self).__name__}: in_backward must be True, False or None, got {in_backward!r}")
        # What the user asked for (None: not said; the Trainer then chooses).
        self.in_backward_requested = in_backward
        self._set_in_backward(bool(in_backward))

    @property
    def in_backward(self) -> bool:
        """True: each table's update runs inside ``backward``, as soon as the
        gradient of its lookups arrives (TorchRec's optimizer in backward,
        fbgemm's fused TBE); the pooled gradient goes straight into the
        update, with no gradient tensor of the looked-up rows. ``step``
        then only advances the step counts. Use it when nothing needs the
        sparse gradient between ``backward`` and ``step``: no gradient
        accumulation (each ``backward`` is an update), no loss scaling, no
        clipping. Two updates of a table in backward with no ``step``
        between are refused (RuntimeError). False (the default, or None:
        not said, which lets the ``Trainer`` choose): gradients wait for
        ``step``. Applies to lookups made after it is set."""
        return self._in_backward

    @in_backward.setter
    def in_backward(self, on: bool) -> None:
        if not isinstance(on, bool):
            raise TypeError(f"{type(self).__name__}: in_backward must be True or False, got {on!r}")
        self.in_backward_requested = on
        self._set_in_backward(on)

    def _set_in_backward(self, on: bool) -> None:
        self._in_backward = on
        for t in self.tables.values():
            if on:
                t.in_backward = self
            elif t.in_backward is self:
                t.in_backward = None

    def _hyper(self, group) -> list[float]:
        raise NotImplementedError

    def _kernel(self, group):
        key = tuple(self._hyper(group))
        k = self._kernels.get(key)
        if k is None:
            k = _native.SparseOptimizerKernel(self.kind, list(key))
            self._kernels[key] = k
        return k

    def table_of(self, p) -> HashTable:
        return self.tables[id(p)]

    def _placement(self, table: HashTable):
        """(placeholder, param group) of ``table``."""
        for group in self.param_groups:
            for p in group["params"]:
                if self.tables[id(p)] is table:
                    return p, group
        raise ValueError(f"{type(self).__name__}: table {table.name!r} is not optimized here")

    def _apply(self, group, work) -> None:
        """One native call for ``work`` ((placeholder, table, pending
        gradients) of tables of ``group``), the tables in parallel, each at
        the step after its count. Raises ValueError naming the first table
        that refused (each refusing table is unchanged); the others are
        updated."""
        if not work:
            return
        errors = _native.apply_gradients_many(
            [t.native for _, t, _ in work],
            [pd[0] for _, _, pd in work],
            [pd[1] for _, _, pd in work],
            [pd[2] for _, _, pd in work],
            self._kernel(group),
            float(group["lr"]),
            [int(self.state[p].get("step", 0)) + 1 for p, _, _ in work],
        )
        failed = None
        for (p, table, _), err in zip(work, errors, strict=True):
            if err is None:
                self._updated.add(id(p))
            elif failed is None:
                failed = f"table {table.name!r}: {err}"
        if failed is not None:
            raise ValueError(failed)

    @torch.no_grad()
    def step(self, closure=None):
        """Applies the pending gradients of every table, then advances each
        table's step (and, for tables updated since the last step, here or
        in backward, their optimizer step count). A non-finite gradient
        raises ValueError and changes nothing in that table."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            # One native call for the group's tables, applied in parallel.
            work = []
            for p in group["params"]:
                table = self.tables[id(p)]
                pending = table.pending_gradients()
                if pending is not None:
                    work.append((p, table, pending))
            try:
                self._apply(group, work)
            except ValueError:
                self._close_step(group, advance=False)
                raise
            self._close_step(group, advance=True)
        return loss

    def _close_step(self, group, advance: bool) -> None:
        """Ends ``group``'s step: pending lookups dropped, the step count of
        each table updated since the last step advanced, and (``advance``)
        each table's clock."""
        for p in group["params"]:
            table = self.tables[id(p)]
            table.clear_pending()
            if id(p) in self._updated:
                self._updated.discard(id(p))
                self.state[p]["step"] = int(self.state[p].get("step", 0)) + 1
            if advance:
                table.step += 1

    def _check_once(self, p, table: HashTable) -> None:
        if id(p) in self._updated:
            raise RuntimeError(
                f"{type(self).__name__}: table {table.name!r} was already updated in backward since the last step(); "
                "with in_backward=True each backward is an update, so step() must come between two (accumulating "
                "gradients, or a second backward through the same lookups, needs in_backward=False)"
            )

    @torch.no_grad()
    def apply_in_backward(self, tables: list[HashTable]) -> list[torch.Tensor]:
        """Optimizer in backward: applies now the gradients that every
        pending lookup of ``tables`` has received (one native call a param
        group). Called from ``backward`` (``recis.nn.backend``). Returns the
        leaves of the lookups it took. Every group is tried; the first
        refusal is raised after (a refusing table is unchanged)."""
        by_group: dict[int, tuple] = {}
        for t in tables:
            p, group = self._placement(t)
            by_group.setdefault(id(group), (group, []))[1].append((p, t))
        leaves, failed = [], None
        for group, members in by_group.values():
            work = []
            for p, t in members:
                self._check_once(p, t)
            for p, t in members:
                entries = t.take_pending()
                leaves.extend(w for _r, w, _part in entries)
                pending = t.pending_gradients(entries)
                if pending is not None:
                    work.append((p, t, pending))
            try:
                self._apply(group, work)
            except ValueError as e:
                failed = failed or e
        if failed is not None:
            raise failed
        return leaves

    def fused_target(self, table: HashTable):
        """(kernel, lr, step, done) of ``table``'s next update in backward;
        ``done()`` records that it ran (``recis.nn.backend.FusedUpdate``)."""
        p, group = self._placement(table)
        self._check_once(p, table)
        step = int(self.state[p].get("step", 0)) + 1
        return self._kernel(group), float(group["lr"]), step, lambda: self._updated.add(id(p))

    @torch.no_grad()
    def unscale_(self, factor: float) -> bool:
        """Multiplies every pending gradient by ``factor`` (each lookup block
        once, even when several tables share it); True if all are finite.
        For loss scaling (``recis.framework.scaler``)."""
        if self._in_backward:
            raise RuntimeError(
                f"{type(self).__name__}: in_backward=True updates the tables inside backward, so there is no "
                "sparse gradient left to unscale; loss scaling needs in_backward=False"
            )
        seen: set[int] = set()
        finite = True
        for t in self.tables.values():
            for w in t.pending_leaves():
                if id(w) in seen or w.grad is None:
                    continue
                seen.add(id(w))
                g = w.grad._values() if w.grad.is_sparse else w.grad
                g.mul_(factor)
                finite &= bool(torch.isfinite(g).all())
        return finite

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clears the gradients that have arrived since the last step, as
        torch's ``zero_grad`` does; lookups whose backward has not run yet
        keep their place (``forward; zero_grad(); backward(); step()``
        trains). ``set_to_none`` is accepted for torch's signature: a
        cleared gradient is dropped either way."""
        leaves = []
        for t in self.tables.values():
            leaves.extend(t.release_gradients())
        for w in leaves:
            w.grad = None

    def state_dict(self) -> dict:
        """JSON-serialisable: hyper-parameters per group and each table's step
        count (slots are saved with the tables)."""
        groups = []
        for group in self.param_groups:
            g = {k: v for k, v in group.items() if k != "params"}
            g["tables"] = [self.tables[id(p)].name for p in group["params"]]
            groups.append(g)
        state = {
            self.tables[id(p)].name: {"step": int(self.state[p].get("step", 0))}
            for group in self.param_groups
            for p in group["params"]
        }
        return {"kind": self.kind, "param_groups": groups, "state": state}

    def load_state_dict(self, state_dict: dict, renamed: dict[str, list[str]] | None = None) -> None:
        """Restores ``state_dict``. ``renamed``: {this optimizer's table: the
        saved tables its rows came from} when the tables changed (features
        added, removed or coalesced otherwise: ``CheckpointManager.load``
        passes it): the groups then match by position, and a table's step
        count is the largest of its sources' (0 for a table with none)."""
        if state_dict.get("kind") != self.kind:
            raise ValueError(
                f"{type(self).__name__}: state is from a {state_dict.get('kind')!r} optimizer, not {self.kind!r}"
            )
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(
                f"{type(self).__name__}: state has {len(groups)} param groups, optimizer has {len(self.param_groups)}"
            )
        for saved, group in zip(groups, self.param_groups, strict=True):
            names = [self.tables[id(p)].name for p in group["params"]]
            if saved.get("tables") != names and renamed is None:
                raise ValueError(
                    f"{type(self).__name__}: state is for tables {saved.get('tables')}, optimizer has {names}"
                )
            for k, v in saved.items():
                if k != "tables":
                    group[k] = v
            for p in group["params"]:
                name = self.tables[id(p)].name
                sources = [name] if renamed is None else renamed.get(name, [name])
                steps = [int(state_dict["state"][s].get("step", 0)) for s in sources if s in state_dict["state"]]
                self.state[p]["step"] = max(steps, default=0)


def _check_lr(lr):
    if not (isinstance(lr, (int, float)) and lr >= 0):
        raise ValueError(f"lr must be a non-negative number, got {lr!r}")


class SparseSGD(SparseOptimizer):
    """``torch.optim.SGD`` on touched rows (no momentum)."""

    kind = "sgd"

    def __init__(self, tables, lr: float = 0.01, weight_decay: float = 0.0, in_backward: bool | None = None):
        _check_lr(lr)
        super().__init__(tables, dict(lr=lr, weight_decay=weight_decay), in_backward)

    def _hyper(self, g):
        return [g["weight_decay"]]


class SparseAdagrad(SparseOptimizer):
    """``torch.optim.Adagrad`` with sparse gradients (weight decay, which torch
    refuses for sparse gradients, is added to the gradient of touched rows)."""

    kind = "adagrad"

    def __init__(
        self,
        tables,
        lr: float = 0.01,
        lr_decay: float = 0.0,
        weight_decay: float = 0.0,
        initial_accumulator_value: float = 0.0,
        eps: float = 1e-10,
        in_backward: bool | None = None,
    ):
        _check_lr(lr)
        super().__init__(
            tables,
            dict(
                lr=lr,
                lr_decay=lr_decay,
                weight_decay=weight_decay,
                initial_accumulator_value=initial_accumulator_value,
                eps=eps,
            ),
            in_backward,
        )

    def _hyper(self, g):
        return [g["lr_decay"], g["eps"], g["initial_accumulator_value"], g["weight_decay"]]


class SparseRowWiseAdagrad(SparseOptimizer):
    """FBGEMM/TorchRec row-wise Adagrad: one accumulator per row, growing by the
    mean squared gradient of the row; ``w -= lr * g / (sqrt(acc) + eps)``."""

    kind = "rowwise_adagrad"

    def __init__(
        self,
        tables,
        lr: float = 0.01,
        weight_decay: float = 0.0,
        initial_accumulator_value: float = 0.0,
        eps: float = 1e-10,
        in_backward: bool | None = None,
    ):
        _check_lr(lr)
        super().__init__(
            tables,
            dict(lr=lr, weight_decay=weight_decay, initial_accumulator_value=initial_accumulator_value, eps=eps),
            in_backward,
        )

    def _hyper(self, g):
        return [g["eps"], g["initial_accumulator_value"], g["weight_decay"]]


class SparseAdam(SparseOptimizer):
    """``torch.optim.SparseAdam``: lazy Adam (moments of untouched rows do not
    decay); optional L2 ``weight_decay`` added to the gradient."""

    kind = "adam"

    def __init__(
        self,
        tables,
        lr: float = 1e-3,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        in_backward: bool | None = None,
    ):
        _check_lr(lr)
        super().__init__(tables, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay), in_backward)

    def _hyper(self, g):
        return [g["betas"][0], g["betas"][1], g["eps"], g["weight_decay"]]


class SparseAdamW(SparseAdam):
    """Lazy Adam plus decoupled weight decay on touched rows:
    ``w *= 1 - lr * weight_decay`` before the Adam update (``torch.optim.AdamW``'s
    rule, applied only to rows with a gradient this step)."""

    kind = "adamw"

    def __init__(
        self,
        tables,
        lr: float = 1e-3,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        in_backward: bool | None = None,
    ):
        super().__init__(tables, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, in_backward=in_backward)
