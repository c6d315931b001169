"""`Feature` and `FeatureEngine`: chains of ops per feature, run fused.

``FeatureEngine(features)`` compiles the chains into steps by depth: at each
depth the features whose next op has the same type form a group, and a group
runs as one native call over all its features (rayon across features and
chunks inside). Columns of the batch that no feature selects (labels, dense
features) pass through to the output unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

from recis.features.ops import FeatureOpError, Op, SelectField, SelectFields


class Feature:
    """A named chain of ops. It starts from a ``SelectField``/``SelectFields``;
    without one, ``SelectField(name)`` is implied.

    Example::

        Feature("user").add_op(SelectField("user_id")).add_op(Hash()).add_op(Mod(1 << 20))
    """

    def __init__(self, name: str):
        if not isinstance(name, str) or not name:
            raise ValueError(f"Feature name must be a non-empty string, got {name!r}")
        self.name = name
        self.ops: list[Op] = []

    def add_op(self, op: Op) -> Feature:
        if not isinstance(op, Op):
            raise TypeError(f"feature {self.name!r}: add_op takes a feature op, got {type(op).__name__}")
        if isinstance(op, (SelectField, SelectFields)) and self.ops:
            raise FeatureOpError(f"feature {self.name!r}: {op.kind} must be the first op")
        self.ops.append(op)
        return self

    def chain(self) -> list[Op]:
        """The ops with the selection first."""
        if self.ops and isinstance(self.ops[0], (SelectField, SelectFields)):
            return list(self.ops)
        return [SelectField(self.name), *self.ops]

    def __repr__(self) -> str:
        return f"Feature({self.name!r}, {self.chain()})"


class FeatureEngine:
    """Runs features on a batch dict; ``fuse=False`` runs each feature's ops
    one by one (the reference the fused run must equal)."""

    def __init__(self, features: Sequence[Feature], fuse: bool = True):
        names = [f.name for f in features]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"FeatureEngine: feature names must be unique; repeated: {sorted(dup)}")
        self.features = list(features)
        self.fuse = fuse
        self._chains = {f.name: f.chain() for f in self.features}
        self._selected = set()
        for chain in self._chains.values():
            sel = chain[0]
            self._selected.update(sel.names if isinstance(sel, SelectFields) else [sel.name])
        depth = max((len(c) for c in self._chains.values()), default=0)
        # steps[d]: groups of (op type, feature names) at depth d >= 1.
        self.steps: list[list[tuple[type, list[str]]]] = []
        for d in range(1, depth):
            groups: dict[tuple, list[str]] = {}
            for name, chain in self._chains.items():
                if d < len(chain):
                    op = chain[d]
                    key = (type(op),) if (fuse and op.fusable) else (type(op), name)
                    groups.setdefault(key, []).append(name)
            self.steps.append([(key[0], members) for key, members in groups.items()])

    def __call__(self, batch: dict) -> dict:
        values = {name: chain[0].select(batch, name) for name, chain in self._chains.items()}
        if self.fuse:
            for d, groups in enumerate(self.steps, start=1):
                for op_type, members in groups:
                    ops = [self._chains[n][d] for n in members]
                    outs = op_type.run_many(ops, [values[n] for n in members], members)
                    values.update(zip(members, outs, strict=True))
        else:
            for name, chain in self._chains.items():
                for op in chain[1:]:
                    values[name] = type(op).run_many([op], [values[name]], [name])[0]
        out = {k: v for k, v in batch.items() if k not in self._selected and k not in values}
        out.update(values)
        return out

    def describe(self) -> str:
        """The compiled steps: one line per native call."""
        lines = []
        for d, groups in enumerate(self.steps, start=1):
            for op_type, members in groups:
                lines.append(f"depth {d}: {op_type.__name__} x {len(members)}: {', '.join(members)}")
        return "\n".join(lines)
