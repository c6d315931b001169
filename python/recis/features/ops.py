"""Feature ops. Each documents its exact semantics; a test pins each.

Inputs and outputs of ops are batch values: a dense tensor ([B] or [B, K]),
a ``RaggedTensor`` (values [N] or [N, K], offsets [B + 1]), a
``StringColumn``, or — after ``SelectFields`` — a list of these. Ops that map
values one to one keep the structure (a dense input gives a dense output, a
ragged one a ragged one with the same offsets and weights).

Fusable ops implement ``run_many(ops, inputs, where)``: one native call for
every feature that applies this op type at a given depth (the feature engine
groups them); running a single op is ``run_many`` with one feature.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from recis import _native
from recis.features.strings import StringColumn
from recis.ragged import RaggedTensor

U64 = 2**64


class FeatureOpError(ValueError):
    """A bad input or parameter of a feature op; the message names both."""


def _err(where: str, op: str, msg: str) -> FeatureOpError:
    """An error naming the feature (``where``; "?" while the op is being
    built and has no feature yet) and the op."""
    if where == "?":
        return FeatureOpError(f"{op}: {msg}")
    return FeatureOpError(f"feature {where!r}: {op}: {msg}")


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    if isinstance(x, RaggedTensor):
        return f"a RaggedTensor of {x.values.dtype}"
    return type(x).__name__


def _flat(x, where: str, op: str, kinds: str):
    """(flat numpy values, rebuild) of a dense tensor or RaggedTensor, where
    rebuild(new flat torch values of the same length) gives the structure back."""
    if isinstance(x, RaggedTensor):
        values = x.values
        if values.dim() != 1:
            raise _err(where, op, f"expected 1-D ragged values, got shape {tuple(values.shape)}")
        return values.numpy(), lambda v: RaggedTensor(v, x.offsets, x.weights, validate=False)
    if isinstance(x, torch.Tensor):
        if x.device.type != "cpu":
            raise _err(where, op, "inputs must be on the CPU")
        shape = x.shape
        return x.reshape(-1).contiguous().numpy(), lambda v: v.reshape(shape)
    raise _err(where, op, f"expected {kinds}, got {_describe(x)}")


def _int64_flat(x, where: str, op: str):
    flat, rebuild = _flat(x, where, op, "int64 ids (a tensor or RaggedTensor)")
    if flat.dtype != np.int64:
        raise _err(where, op, f"expected int64 ids, got {flat.dtype}")
    return flat, rebuild


class Op:
    """Base of feature ops."""

    fusable = True

    @property
    def kind(self) -> str:
        return type(self).__name__

    def __call__(self, x, where: str = "?"):
        return type(self).run_many([self], [x], [where])[0]

    @classmethod
    def run_many(cls, ops: Sequence[Op], inputs: Sequence, where: Sequence[str]) -> list:
        raise NotImplementedError

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{self.kind}({fields})"


class SelectField(Op):
    """The batch column ``name`` (the first op of a feature)."""

    fusable = False

    def __init__(self, name: str):
        self.name = name

    def select(self, batch: dict, where: str):
        if self.name not in batch:
            raise _err(where, "SelectField", f"column {self.name!r} is not in the batch (columns: {sorted(batch)})")
        return batch[self.name]


class SelectFields(Op):
    """The batch columns ``names``, as a list (e.g. for ``FeatureCross``)."""

    fusable = False

    def __init__(self, names: Sequence[str]):
        self.names = list(names)

    def select(self, batch: dict, where: str):
        missing = [n for n in self.names if n not in batch]
        if missing:
            raise _err(where, "SelectFields", f"columns {missing} are not in the batch (columns: {sorted(batch)})")
        return [batch[n] for n in self.names]


def _check_bucket(bucket, where, op):
    if not isinstance(bucket, int) or not 0 <= bucket < U64:
        raise _err(where, op, f"bucket must be an int in [0, 2**64), got {bucket!r}")


class Hash(Op):
    """Strings or int64 ids → int64 ids by FarmHash ``Fingerprint64`` (the
    hash of TensorFlow's ``to_hash_bucket_fast`` and of the RecIS ORC reader).

    - A string hashes its UTF-8 bytes; the empty string hashes to
      ``fingerprint64(b"") = 11160318154034397263``.
    - An int64 id hashes its 8 little-endian bytes.
    - ``bucket > 0``: the result is ``fingerprint % bucket`` on the unsigned
      value; ``bucket == 0`` keeps all 64 bits (as a signed int64).

    A ``StringColumn`` with one string a sample gives a dense [B] tensor; with
    several, a RaggedTensor.
    """

    def __init__(self, bucket: int = 0):
        _check_bucket(bucket, "?", "Hash")
        self.bucket = bucket

    @classmethod
    def run_many(cls, ops, inputs, where):
        strings, ids = [], []
        for k, x in enumerate(inputs):
            if isinstance(x, StringColumn):
                strings.append(k)
            else:
                ids.append(k)
        out: list = [None] * len(inputs)
        if strings:
            hashed = _native.hash_strings_many(
                [(inputs[k].bytes, inputs[k].str_offsets) for k in strings], [ops[k].bucket for k in strings]
            )
            for k, h in zip(strings, hashed, strict=True):
                col, values = inputs[k], torch.from_numpy(h)
                out[k] = (
                    values
                    if col.offsets is None
                    else RaggedTensor(values, torch.from_numpy(col.offsets), validate=False)
                )
        if ids:
            flats = [_int64_flat(inputs[k], where[k], "Hash") for k in ids]
            hashed = _native.hash_ids_many([f for f, _ in flats], [ops[k].bucket for k in ids])
            for k, (_, rebuild), h in zip(ids, flats, hashed, strict=True):
                out[k] = rebuild(torch.from_numpy(h))
        return out


class Mod(Op):
    """``id % mod`` with the id taken as unsigned 64-bit, as Python's ``%`` on
    ``id & (2**64 - 1)``: a negative id is its two's-complement value
    (``-1 % 10 == 5``). The result lies in ``[0, mod)``. ``mod`` must be >= 1."""

    def __init__(self, mod: int):
        if not isinstance(mod, int) or not 1 <= mod < U64:
            raise _err("?", "Mod", f"mod must be an int in [1, 2**64), got {mod!r}")
        self.mod = mod

    @classmethod
    def run_many(cls, ops, inputs, where):
        flats = [_int64_flat(x, w, "Mod") for x, w in zip(inputs, where, strict=True)]
        outs = _native.mod_many([f for f, _ in flats], [op.mod for op in ops])
        return [rebuild(torch.from_numpy(o)) for (_, rebuild), o in zip(flats, outs, strict=True)]


class Bucketize(Op):
    """Bucket index of each value, as ``torch.bucketize(x, boundaries,
    right=False)``: the number of boundaries strictly below the value, so a
    value equal to a boundary falls in the bucket to its left; results lie in
    ``[0, len(boundaries)]``. NaN goes to the last bucket. ``boundaries`` must
    be finite and non-decreasing. Int or float input; int64 output."""

    def __init__(self, boundaries: Sequence[float]):
        b = np.asarray(boundaries, dtype=np.float64)
        if b.ndim != 1 or not np.isfinite(b).all():
            raise _err("?", "Bucketize", "boundaries must be a 1-D sequence of finite numbers")
        if (np.diff(b) < 0).any():
            i = int(np.flatnonzero(np.diff(b) < 0)[0])
            raise _err(
                "?", "Bucketize", f"boundaries must be sorted; boundaries[{i}]={b[i]} > boundaries[{i + 1}]={b[i + 1]}"
            )
        self.boundaries = b

    @classmethod
    def run_many(cls, ops, inputs, where):
        flats = []
        for x, w in zip(inputs, where, strict=True):
            flat, rebuild = _flat(x, w, "Bucketize", "numbers (a tensor or RaggedTensor)")
            if flat.dtype.kind not in "iuf":
                raise _err(w, "Bucketize", f"expected numbers, got {flat.dtype}")
            flats.append((flat.astype(np.float64, copy=False), rebuild))
        outs = _native.bucketize_many([f for f, _ in flats], [op.boundaries for op in ops])
        return [rebuild(torch.from_numpy(o)) for (_, rebuild), o in zip(flats, outs, strict=True)]


def _as_ragged_ids(x, where: str, op: str) -> RaggedTensor:
    if isinstance(x, RaggedTensor):
        if x.values.dtype != torch.int64 or x.values.dim() != 1:
            raise _err(where, op, f"expected int64 ids, got {_describe(x)}")
        return x
    if isinstance(x, torch.Tensor) and x.dtype == torch.int64 and x.dim() in (1, 2):
        return RaggedTensor.from_dense(x.reshape(x.shape[0], -1))
    raise _err(where, op, f"expected int64 ids (a tensor or RaggedTensor), got {_describe(x)}")


class FeatureCross(Op):
    """Pairwise cross of two id features of the same batch size (the input is
    a list of two, from ``SelectFields`` or earlier ops). Row ``i`` of the
    result holds, for each id ``a`` of row ``i`` of the first and then each id
    ``b`` of row ``i`` of the second (first-major order),
    ``fingerprint64(le_bytes(a) + le_bytes(b))`` (``% bucket`` if
    ``bucket > 0``). A row with an empty side is empty. Output: RaggedTensor."""

    def __init__(self, bucket: int = 0):
        _check_bucket(bucket, "?", "FeatureCross")
        self.bucket = bucket

    @classmethod
    def run_many(cls, ops, inputs, where):
        pairs = []
        for x, w in zip(inputs, where, strict=True):
            if not isinstance(x, (list, tuple)) or len(x) != 2:
                raise _err(w, "FeatureCross", f"expected a list of two features, got {_describe(x)}")
            a, b = (_as_ragged_ids(v, w, "FeatureCross") for v in x)
            if a.batch_size != b.batch_size:
                raise _err(w, "FeatureCross", f"the two features have batch sizes {a.batch_size} and {b.batch_size}")
            pairs.append((a.values.numpy(), a.offsets.numpy(), b.values.numpy(), b.offsets.numpy()))
        outs = _native.cross_many(pairs, [op.bucket for op in ops])
        return [RaggedTensor(torch.from_numpy(v), torch.from_numpy(o), validate=False) for v, o in outs]


class SequenceTruncate(Op):
    """At most ``max_len`` elements of each sequence. ``side="right"`` cuts
    from the right (keeps the first ``max_len``); ``side="left"`` cuts from
    the left (keeps the last ``max_len``).

    2-D: a RaggedTensor (values [N]) or a dense [B, L] tensor; 3-D: a
    RaggedTensor whose values are [N, K] (each sequence element a K-vector) or
    a dense [B, L, K] tensor. With ``pad=True`` a ragged result is padded with
    ``pad_value`` to a dense [B, max_len] / [B, max_len, K] tensor, elements
    left-aligned. A dense input stays dense: [B, min(L, max_len), ...]."""

    def __init__(self, max_len: int, side: str = "right", pad: bool = False, pad_value=0):
        if not isinstance(max_len, int) or max_len < 0:
            raise _err("?", "SequenceTruncate", f"max_len must be an int >= 0, got {max_len!r}")
        if side not in ("left", "right"):
            raise _err("?", "SequenceTruncate", f"side must be 'left' or 'right', got {side!r}")
        self.max_len, self.side, self.pad, self.pad_value = max_len, side, pad, pad_value

    @classmethod
    def run_many(cls, ops, inputs, where):
        out: list = [None] * len(inputs)
        ragged = []
        for k, (op, x, w) in enumerate(zip(ops, inputs, where, strict=True)):
            if isinstance(x, RaggedTensor):
                ragged.append(k)
            elif isinstance(x, torch.Tensor) and x.dim() in (2, 3):
                out[k] = x[:, : op.max_len] if op.side == "right" else x[:, max(0, x.shape[1] - op.max_len) :]
            else:
                raise _err(
                    w, "SequenceTruncate", f"expected a RaggedTensor or a [B, L(, K)] tensor, got {_describe(x)}"
                )
        if ragged:
            res = _native.truncate_many(
                [inputs[k].offsets.numpy() for k in ragged],
                [ops[k].max_len for k in ragged],
                [ops[k].side == "right" for k in ragged],
            )
            for k, (index, offsets) in zip(ragged, res, strict=True):
                x, op = inputs[k], ops[k]
                idx = torch.from_numpy(index)
                weights = None if x.weights is None else x.weights[idx]
                rt = RaggedTensor(x.values[idx], torch.from_numpy(offsets), weights, validate=False)
                out[k] = rt.to_dense(pad=op.pad_value, length=op.max_len) if op.pad else rt
        return out


class IDMultiHash(Op):
    """``k = len(buckets)`` independent hashes of each int64 id: hash ``j`` is
    ``fingerprint64(le_bytes(id) + le_bytes(j)) % buckets[j]`` (unsigned ``j``,
    8 bytes). Each id becomes a row of k ids: a [B] input gives [B, k], a
    RaggedTensor gives one whose values are [N, k] (same offsets)."""

    def __init__(self, buckets: Sequence[int]):
        if not buckets or any(not isinstance(b, int) or not 1 <= b < U64 for b in buckets):
            raise _err("?", "IDMultiHash", f"buckets must be a non-empty list of ints in [1, 2**64), got {buckets!r}")
        self.buckets = list(buckets)

    @classmethod
    def run_many(cls, ops, inputs, where):
        flats = [_int64_flat(x, w, "IDMultiHash") for x, w in zip(inputs, where, strict=True)]
        outs = _native.multi_hash_many([f for f, _ in flats], [op.buckets for op in ops])
        res = []
        for x, op, o in zip(inputs, ops, outs, strict=True):
            v = torch.from_numpy(o)
            if isinstance(x, RaggedTensor):
                res.append(RaggedTensor(v, x.offsets, x.weights, validate=False))
            else:
                res.append(v.reshape(*x.shape, len(op.buckets)))
        return res


class FillMissing(Op):
    """Fills what is missing: an empty row of a RaggedTensor gets the one
    element ``value`` (weight 1.0 if weighted); NaN in a float tensor becomes
    ``value``. Other inputs pass unchanged."""

    fusable = False

    def __init__(self, value):
        self.value = value

    @classmethod
    def run_many(cls, ops, inputs, where):
        return [op._fill(x) for op, x in zip(ops, inputs, strict=True)]

    def _fill(self, x):
        if isinstance(x, RaggedTensor):
            lengths = x.lengths()
            empty = lengths == 0
            if not bool(empty.any()):
                return x
            new_lengths = torch.where(empty, torch.ones_like(lengths), lengths)
            offsets = torch.zeros_like(x.offsets)
            torch.cumsum(new_lengths, 0, out=offsets[1:])
            values = torch.full((int(offsets[-1]), *x.values.shape[1:]), self.value, dtype=x.values.dtype)
            keep = torch.repeat_interleave(~empty, new_lengths)
            values[keep] = x.values
            weights = None
            if x.weights is not None:
                weights = torch.ones(int(offsets[-1]), dtype=x.weights.dtype)
                weights[keep] = x.weights
            return RaggedTensor(values, offsets, weights, validate=False)
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            return torch.nan_to_num(x, nan=float(self.value), posinf=float("inf"), neginf=float("-inf"))
        return x


class Lambda(Op):
    """A user's own function of the feature's value (not fused: called once
    per feature)."""

    fusable = False

    def __init__(self, fn: Callable, name: str | None = None):
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "lambda")

    @classmethod
    def run_many(cls, ops, inputs, where):
        out = []
        for op, x, w in zip(ops, inputs, where, strict=True):
            try:
                out.append(op.fn(x))
            except Exception as e:
                raise _err(w, f"Lambda({op.name})", f"{type(e).__name__}: {e}") from e
        return out
