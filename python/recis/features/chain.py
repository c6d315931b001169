"""Op chains as plain data: a job's ``[[feature]] ops = [...]``.

Each op is a table ``{op = "<name>", <its arguments>}``:

- ``{op = "fill_missing", value = V}``: ``FillMissing(V)`` (an empty list
  row gets the one element V; NaN in a float column becomes V);
- ``{op = "bucketize", boundaries = [b0, b1, ...]}``: ``Bucketize`` (numbers
  → bucket ids 0..len(boundaries));
- ``{op = "hash", bucket = 0}``: ``Hash`` (strings or ids → FarmHash ids,
  ``% bucket`` when > 0);
- ``{op = "mod", mod = M}``: ``Mod`` (ids % M, unsigned);
- ``{op = "cross", bucket = 0}``: ``FeatureCross`` of the feature's two
  ``columns`` (first-major pairs of their ids; the first op of such a
  feature);
- ``{op = "truncate", max_len = N, side = "right"}``: ``SequenceTruncate``
  of a list column (``"right"`` keeps the first N, ``"left"`` the last N);
- ``{op = "multi_hash", buckets = [m1, m2, ...]}``: ``IDMultiHash`` (each
  id becomes k ids, one per bucket).

``check_chain`` type-checks a chain against the types of the columns it
reads before anything runs: a bucketize of ids (the output of hash, mod,
cross, multi_hash or bucketize), a hash of floats, a cross of a missing or
string column, a truncate of a scalar, or a chain that does not end in
integer ids is a ``FeatureOpError`` naming the feature, the op (by position)
and the fix. ``build_ops`` makes the ``recis.features`` ops the chain names,
which ``recis.io.pipeline.InputPipeline`` runs fused in one
``FeatureEngine`` for all the job's features.
"""

from __future__ import annotations

from dataclasses import dataclass

from recis.features.ops import (
    Bucketize,
    FeatureCross,
    FeatureOpError,
    FillMissing,
    Hash,
    IDMultiHash,
    Mod,
    Op,
    SequenceTruncate,
)

# op name -> (its arguments: name -> required, the Op it builds)
OPS = {
    "fill_missing": ({"value": True}, lambda a: FillMissing(a["value"])),
    "bucketize": ({"boundaries": True}, lambda a: Bucketize(a["boundaries"])),
    "hash": ({"bucket": False}, lambda a: Hash(a.get("bucket", 0))),
    "mod": ({"mod": True}, lambda a: Mod(a["mod"])),
    "cross": ({"bucket": False}, lambda a: FeatureCross(a.get("bucket", 0))),
    "truncate": ({"max_len": True, "side": False}, lambda a: SequenceTruncate(a["max_len"], a.get("side", "right"))),
    "multi_hash": ({"buckets": True}, lambda a: IDMultiHash(a["buckets"])),
}


@dataclass(frozen=True)
class Kind:
    """What a value of a chain is: ``"int"`` (an integer column as read:
    ids, or numbers to bucketize), ``"float"``, ``"string"``, ``"id"``
    (an op's ids) or ``"pair"`` (two columns, for cross); ``is_list``: a
    list a row."""

    of: str
    is_list: bool = False

    def __str__(self) -> str:
        what = {"int": "integers", "float": "floats", "string": "strings", "id": "ids", "pair": "two columns"}[self.of]
        return f"a list of {what} a row" if self.is_list else what


def column_kind(dtype: str, is_list: bool, hashed: bool = False) -> Kind:
    """The Kind of a column of the reader's ``types`` (hashed at read: ids)."""
    if hashed:
        return Kind("id", is_list)
    if dtype in ("float32", "float64"):
        return Kind("float", is_list)
    if dtype == "string":
        return Kind("string", is_list)
    return Kind("int", is_list)  # int64, and booleans read as ints


def _where(feature: str, k: int, name: str) -> str:
    return f"feature {feature!r}: ops[{k}] ({name})"


def validate(specs, feature: str, n_columns: int) -> list[dict]:
    """``specs`` (a list of tables) checked for shape: each names a known op
    and only its arguments; returns them as plain dicts. The ops' own
    argument checks run in ``build_ops``."""
    if not isinstance(specs, list):
        raise FeatureOpError(f"feature {feature!r}: ops must be a list of {{op = ...}} tables, got {specs!r}")
    out = []
    for k, spec in enumerate(specs):
        if not isinstance(spec, dict) or not isinstance(spec.get("op"), str):
            raise FeatureOpError(f'feature {feature!r}: ops[{k}]: expected a table {{op = "name", ...}}, got {spec!r}')
        name = spec["op"]
        if name not in OPS:
            raise FeatureOpError(f"feature {feature!r}: ops[{k}]: unknown op {name!r} (known: {sorted(OPS)})")
        args, _ = OPS[name]
        extra = sorted(set(spec) - {"op"} - set(args))
        if extra:
            raise FeatureOpError(f"{_where(feature, k, name)}: unknown argument(s) {extra} (known: {sorted(args)})")
        missing = sorted(a for a, required in args.items() if required and a not in spec)
        if missing:
            raise FeatureOpError(f"{_where(feature, k, name)}: missing argument(s) {missing}")
        out.append(dict(spec))
    if n_columns > 1 and (not out or out[0]["op"] != "cross"):
        raise FeatureOpError(
            f"feature {feature!r}: it reads {n_columns} columns, so its first op must be cross (two columns in, "
            "one feature of ids out)"
        )
    return out


def build_ops(specs, feature: str) -> list[Op]:
    """The ops of a validated chain (argument errors name the feature and op)."""
    ops = []
    for k, spec in enumerate(specs):
        _, make = OPS[spec["op"]]
        try:
            ops.append(make({a: v for a, v in spec.items() if a != "op"}))
        except FeatureOpError as e:
            raise FeatureOpError(f"{_where(feature, k, spec['op'])}: {e}") from None
        except (TypeError, ValueError) as e:
            raise FeatureOpError(f"{_where(feature, k, spec['op'])}: bad arguments ({e})") from None
    return ops


def check_chain(specs, feature: str, inputs: list[tuple[str, Kind]]) -> Kind:
    """The Kind a chain gives, from its input columns ``inputs`` ([(column,
    Kind)]); a chain that does not type-check, or does not end in integer
    ids, is a FeatureOpError naming the op and the fix."""
    kind = Kind("pair") if len(inputs) > 1 else inputs[0][1]
    for k, spec in enumerate(specs):
        name, where = spec["op"], _where(feature, k, spec["op"])
        if kind.of == "pair" and name != "cross":
            raise FeatureOpError(f"{where}: takes one column; the feature's columns are crossed by its first op")
        if name == "fill_missing":
            if kind.of == "string":
                raise FeatureOpError(f'{where}: a string column has no missing values to fill (nulls read as "")')
            if kind.of in ("int", "id") and not kind.is_list:
                raise FeatureOpError(
                    f"{where}: an integer column of one value a row has no missing values (nulls read as 0)"
                )
        elif name == "bucketize":
            if kind.of == "id":
                raise FeatureOpError(
                    f"{where}: bucketize takes numbers, and the input is ids (the output of an earlier op): "
                    "bucketize the column before hashing it"
                )
            if kind.of == "string":
                raise FeatureOpError(f"{where}: bucketize takes numbers, and the column holds strings")
            kind = Kind("id", kind.is_list)
        elif name == "hash":
            if kind.of == "float":
                raise FeatureOpError(
                    f"{where}: hash takes strings or integer ids, and the column holds floats: bucketize it first"
                )
            kind = Kind("id", kind.is_list)
        elif name in ("mod", "multi_hash"):
            if kind.of not in ("int", "id"):
                raise FeatureOpError(f"{where}: {name} takes integer ids, and the input is {kind}")
            kind = Kind("id", kind.is_list or name == "multi_hash")
        elif name == "cross":
            if kind.of != "pair" or len(inputs) != 2:
                raise FeatureOpError(
                    f'{where}: cross takes two columns: set the feature\'s columns = ["a", "b"] (it reads '
                    f"{len(inputs)})"
                )
            for column, c in inputs:
                if c.of not in ("int", "id"):
                    hint = " (set hash = true to hash the strings at read)" if c.of == "string" else ""
                    raise FeatureOpError(f"{where}: cross takes integer ids, and column {column!r} holds {c}{hint}")
            kind = Kind("id", True)
        elif name == "truncate":
            if not kind.is_list:
                raise FeatureOpError(f"{where}: truncate takes a list column, and the input is {kind}")
    if kind.of == "pair":
        raise FeatureOpError(f'feature {feature!r}: reads two columns and crosses none: ops = [{{op = "cross"}}]')
    if kind.of == "float":
        raise FeatureOpError(
            f"feature {feature!r}: its ops end in floats, and a feature needs integer ids: end with bucketize"
        )
    if kind.of == "string":
        raise FeatureOpError(f"feature {feature!r}: its ops end in strings, and a feature needs integer ids: add hash")
    return kind
