"""`InputPipeline`: reader batches to model input, as a job describes it.

The same pipeline runs in training (``recis.config.Job``), in evaluation and
in serving (``recis.serving.Predictor``), so that a served model sees its
inputs exactly as it saw them in training. It is plain data (``to_json`` /
``from_json``): a serving export carries it in its ``meta.json``.

What it does to a batch of ``OrcDataset``:

- each feature's column becomes the model's ids under the feature's name: a
  scalar int64 column one id a row ([B, 1]), a list column as it is (hashing
  and ``bucket`` happen in the reader, per ``columns()``);
- a feature with ``ops`` (``recis.features.chain``: hash, mod, bucketize,
  cross, truncate, multi_hash, fill_missing) gets its ids from its op chain
  over its column (or its two ``columns``, for cross); the chains of all
  the features run in one ``FeatureEngine``, fused (one native call per op
  type and depth), before the model sees the batch;
- each ``vectors`` column ([column, K]: a ``list<float>`` of K values a row,
  a precomputed text or image embedding) becomes a [B, K] float32 tensor
  under its name; a row of another length is a ``DataError`` naming the
  column, the row and both lengths;
- a feature with ``max_len`` (a sequence: ``[[feature]] combiner =
  "sequence"``) keeps the last ``max_len`` ids of each row
  (``features.SequenceTruncate(max_len, side="left")``: the newest, for a
  history written oldest first);
- the dense columns are stacked into ``"dense"`` [B, len(dense)] float32,
  NaN (a null) read as 0, ±inf per ``non_finite``, then ``dense_transform``
  ("none" or "log1p").

``labels`` (multi-task): every label column, one a task, in the order of the
model's outputs; ``label`` is then the first of them. None (the default): one
label, ``label``, as before multi-task jobs existed (and ``to_json`` writes
no ``labels`` key).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from recis.features.ops import Hash
from recis.features.strings import StringColumn
from recis.io.dataset import NON_FINITE, Column, DataError
from recis.ragged import RaggedTensor

TRANSFORMS = ("none", "log1p")


@dataclass(frozen=True)
class FeatureInput:
    """One sparse feature: the model's name for it and the column it reads
    (``columns``: the columns its ops read, two for a cross); ``ops``: its op
    chain, as ``recis.features.chain`` tables (none: the column's ids as
    they are, hashed at read with ``hash``); ``max_len`` > 0: at most the
    last ``max_len`` ids of a row (0: all)."""

    name: str
    column: str
    hash: bool = False
    bucket: int = 0
    max_len: int = 0
    columns: tuple = ()
    ops: tuple = ()

    def __post_init__(self):
        object.__setattr__(self, "columns", tuple(self.columns))
        object.__setattr__(self, "ops", tuple(dict(o) for o in self.ops))

    def inputs(self) -> tuple:
        """The columns the feature reads."""
        return self.columns or (self.column,)


@dataclass
class InputPipeline:
    features: list[FeatureInput]
    label: str | None = "label"
    dense: list[str] = field(default_factory=list)
    dense_transform: str = "none"
    non_finite: str = "error"
    group: str | None = None
    vectors: list = field(default_factory=list)
    where: str = "input pipeline"  # named in errors (a config file's path)
    labels: list[str] | None = None  # multi-task: every label column; label is the first

    def __post_init__(self):
        if self.labels is not None:
            labels = list(self.labels)
            if not labels or not all(isinstance(x, str) and x for x in labels) or len(set(labels)) != len(labels):
                raise ValueError(f"{self.where}: labels must be distinct column names, at least one, got {labels!r}")
            self.labels = labels
            self.label = labels[0]
        if self.dense_transform not in TRANSFORMS:
            raise ValueError(f"{self.where}: dense_transform must be one of {TRANSFORMS}, got {self.dense_transform!r}")
        if self.non_finite not in NON_FINITE:
            raise ValueError(f"{self.where}: non_finite must be one of {NON_FINITE}, got {self.non_finite!r}")
        self.vectors = [[str(c), int(k)] for c, k in self.vectors]
        bad = [v for v in self.vectors if v[1] < 1]
        if bad:
            raise ValueError(f"{self.where}: a vector column's width must be >= 1, got {bad}")
        self._engine = None
        chained = [f for f in self.features if f.ops]
        if chained:
            from recis.features import Feature, FeatureEngine, SelectField, SelectFields
            from recis.features.chain import build_ops, validate

            feats = []
            for f in chained:
                cols = f.inputs()
                specs = validate(list(f.ops), f.name, len(cols))
                feat = Feature(f.name).add_op(SelectFields(list(cols)) if len(cols) > 1 else SelectField(cols[0]))
                for op in build_ops(specs, f.name):
                    feat.add_op(op)
                feats.append(feat)
            self._engine = FeatureEngine(feats)
            # hash = true with ops: the feature's string columns are hashed
            # to ids (Fingerprint64, as the reader's hash) before its chain.
            self._prehash = sorted({c for f in chained if f.hash for c in f.inputs()})
            plain = {c for f in chained if not f.hash for c in f.inputs()}
            both = sorted(plain & set(self._prehash))
            if both:
                raise ValueError(
                    f"{self.where}: column(s) {both} are read by features with ops both with and without hash = true"
                )
        for f in self.features:
            if isinstance(f.max_len, bool) or not isinstance(f.max_len, int) or f.max_len < 0:
                raise ValueError(f"{self.where}: feature {f.name!r}: max_len must be an int >= 0, got {f.max_len!r}")

    def columns(self, label: bool = True) -> list[Column]:
        """The reader's columns: the label (with ``label``), dense, group,
        then the features' (hashed as configured). A column read twice is a
        ValueError."""
        cols, seen = [], {}

        def add(col: Column, what: str, shared: bool = False):
            if col.name in seen:
                first, was = seen[col.name]
                if shared and first == col and was.startswith("feature"):
                    return  # features reading one column alike share the read
                raise ValueError(
                    f"{self.where}: column {col.name!r} is read twice ({was} and {what})"
                    + (": features reading one column must agree on hash and bucket" if shared else "")
                )
            seen[col.name] = (col, what)
            cols.append(col)

        if label:
            for name in self.labels or ([self.label] if self.label else []):
                add(Column(name), "the label")
        for name in self.dense:
            if name not in seen:
                # float32 in the reader: a float64 value beyond its range is named with its file and row.
                add(Column(name, float32=True), "a dense column")
        if self.group and self.group not in seen:
            add(Column(self.group), "the group column")
        for name, _ in self.vectors:
            add(Column(name), "a vector column")
        for f in self.features:
            if f.ops:
                for c in f.inputs():  # read as they are (hash = true hashes strings before the ops)
                    add(Column(c), f"feature {f.name!r}", shared=True)
            else:
                add(Column(f.column, hash=f.hash, bucket=f.bucket), f"feature {f.name!r}", shared=True)
        return cols

    def __call__(self, batch: dict) -> dict:
        """A reader batch as model input: each feature's ids (a scalar int
        column becomes one id a row), and the dense columns stacked."""
        out = {}
        chained = {}
        if self._engine is not None:
            from recis.features.ops import FeatureOpError

            view = batch
            strings = [c for c in self._prehash if isinstance(batch.get(c), StringColumn)]
            if strings:
                view = dict(batch)
                hashed = Hash.run_many([Hash(0)] * len(strings), [batch[c] for c in strings], strings)
                view.update(zip(strings, hashed, strict=True))
            try:
                chained = self._engine(view)
            except FeatureOpError as e:
                raise DataError(f"{self.where}: {e}") from None
        for f in self.features:
            if f.ops:
                out[f.name] = _as_ids(chained[f.name], f.name, self.where)
                continue
            if f.column not in batch:
                raise DataError(f"{self.where}: feature {f.name!r}: the batch has no column {f.column!r}")
            v = batch[f.column]
            if isinstance(v, torch.Tensor):
                if v.dtype != torch.int64 or v.dim() != 1:
                    raise DataError(
                        f"{self.where}: feature {f.name!r}: column {f.column!r} holds {v.dtype} values; "
                        "a feature needs integer ids (or strings with hash = true)"
                    )
                v = v.unsqueeze(1)
            elif f.max_len:
                v = self._truncate(f)(v, f.name)
            out[f.name] = v
        for name, k in self.vectors:
            out[name] = self._vector(batch, name, k)
        if self.dense:
            missing = [c for c in self.dense if c not in batch]
            if missing:
                raise DataError(f"{self.where}: the batch has no dense columns {missing}")
            x = torch.stack([batch[c].to(torch.float32) for c in self.dense], dim=1)
            if not bool(torch.isfinite(x).all()):
                x = self._finite_dense(batch, x)
            if self.dense_transform == "log1p":
                x = torch.log1p(x.clamp_min(0))
            out["dense"] = x
        return out

    def _vector(self, batch: dict, name: str, k: int) -> torch.Tensor:
        v = batch.get(name)
        if v is None:
            raise DataError(f"{self.where}: the batch has no vector column {name!r}")
        if isinstance(v, torch.Tensor) and v.dim() == 2 and v.shape[1] == k:
            return v.to(torch.float32)
        if not isinstance(v, RaggedTensor) or not v.values.is_floating_point():
            what = f"a {v.dtype} column" if isinstance(v, torch.Tensor) else type(v).__name__
            raise DataError(f"{self.where}: vector column {name!r} must be list<float> of {k} a row, got {what}")
        lengths = v.offsets[1:] - v.offsets[:-1]
        bad = (lengths != k).nonzero()
        if len(bad):
            r = int(bad[0])
            raise DataError(
                f"{self.where}: vector column {name!r}, row {r} of a batch: {int(lengths[r])} values, and the "
                f"column is {k} wide (every row of a vector column holds {k} floats; a null reads as [])"
            )
        return v.values.reshape(-1, k).to(torch.float32)

    def chain_inputs(self) -> dict:
        """{feature name: its input columns}, for the features with ops."""
        return {f.name: f.inputs() for f in self.features if f.ops}

    @staticmethod
    def _truncate(f: FeatureInput):
        from recis.features import SequenceTruncate

        return SequenceTruncate(f.max_len, side="left")

    def _finite_dense(self, batch: dict, x: torch.Tensor) -> torch.Tensor:
        """The dense input ``x`` [B, len(dense)] with NaN (a null) as 0 and
        ±inf per ``non_finite``. The reader has already refused (or
        replaced) ±inf in its columns, so an inf here is a float64 value
        beyond float32's range."""
        inf = torch.isinf(x)
        if self.non_finite == "error" and bool(inf.any()):
            row, j = (int(i) for i in inf.nonzero()[0])
            raise DataError(
                f"{self.where}: [data].dense column {self.dense[j]!r}, row {row} of a batch: "
                f"{float(batch[self.dense[j]][row])!r} is beyond float32's range (the dense input is float32); "
                '[data] non_finite = "clamp" or "zero" replaces such values'
            )
        zero = 0.0 if self.non_finite == "zero" else None  # None: nan_to_num clamps to float32's largest
        return torch.nan_to_num(x, nan=0.0, posinf=zero, neginf=zero)

    def to_json(self) -> dict:
        out = asdict(self)
        del out["where"]
        if not out["vectors"]:
            del out["vectors"]  # a pipeline without them reads as it did before they existed
        for f in out["features"]:  # the fields before ops and max_len existed stay as they were
            if not f["max_len"]:
                del f["max_len"]
            for k in ("columns", "ops"):
                if not f[k]:
                    del f[k]
                else:
                    f[k] = [dict(o) for o in f[k]] if k == "ops" else list(f[k])
        if out["labels"] is None:
            del out["labels"]  # a single-label pipeline's JSON is as it was
        return out

    @classmethod
    def from_json(cls, obj: dict, where: str = "input pipeline") -> InputPipeline:
        """The pipeline ``to_json`` wrote; unknown or malformed fields are a
        ValueError naming ``where``."""
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: expected an object, got {type(obj).__name__}")
        known = {"features", "label", "labels", "dense", "dense_transform", "non_finite", "group", "vectors"}
        unknown = sorted(set(obj) - known)
        if unknown:
            raise ValueError(f"{where}: unknown fields {unknown}")
        try:
            features = [FeatureInput(**f) for f in obj["features"]]
            if not all(isinstance(c, str) for f in features for c in f.columns) or not all(
                isinstance(o, dict) for f in features for o in f.ops
            ):
                raise TypeError("a feature's columns must be names and its ops tables")
            kw = {k: obj[k] for k in known - {"features"} if k in obj}
            if not all(isinstance(c, str) for c in kw.get("dense", [])):
                raise TypeError("dense must be a list of column names")
            if kw.get("labels") is not None and not isinstance(kw["labels"], list):
                raise TypeError("labels must be a list of column names")
            return cls(features=features, where=where, **kw)
        except (KeyError, TypeError) as e:
            raise ValueError(f"{where}: malformed ({e})") from None


def _as_ids(v, name: str, where: str):
    """An op chain's output as the model's ids: a [B] tensor as [B, 1], a
    [B, k] tensor (multi_hash of a scalar column) as k ids a row, a
    RaggedTensor of k-vectors (multi_hash of a list) as k ids an element."""
    if isinstance(v, torch.Tensor):
        if v.dtype != torch.int64 or v.dim() not in (1, 2):
            raise DataError(f"{where}: feature {name!r}: its ops gave {v.dtype} {tuple(v.shape)}, not int64 ids")
        return v.unsqueeze(1) if v.dim() == 1 else v
    if isinstance(v, RaggedTensor):
        if v.values.dim() == 2:
            k = v.values.shape[1]
            weights = None if v.weights is None else v.weights.repeat_interleave(k)
            return RaggedTensor(v.values.reshape(-1), v.offsets * k, weights, validate=False)
        return v
    raise DataError(f"{where}: feature {name!r}: its ops gave {type(v).__name__}, not ids")
