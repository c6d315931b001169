"""`InputPipeline`: reader batches to model input, as a job describes it.

The same pipeline runs in training (``recis.config.Job``), in evaluation and
in serving (``recis.serving.Predictor``), so that a served model sees its
inputs exactly as it saw them in training. It is plain data (``to_json`` /
``from_json``): a serving export carries it in its ``meta.json``.

What it does to a batch of ``OrcDataset``:

- each feature's column becomes the model's ids under the feature's name: a
  scalar int64 column one id a row ([B, 1]), a list column as it is (hashing
  and ``bucket`` happen in the reader, per ``columns()``);
- a feature with ``max_len`` (a sequence: ``[[feature]] combiner =
  "sequence"``) keeps the last ``max_len`` ids of each row
  (``features.SequenceTruncate(max_len, side="left")``: the newest, for a
  history written oldest first);
- the dense columns are stacked into ``"dense"`` [B, len(dense)] float32,
  NaN (a null) read as 0, ±inf per ``non_finite``, then ``dense_transform``
  ("none" or "log1p").
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from recis.io.dataset import NON_FINITE, Column, DataError

TRANSFORMS = ("none", "log1p")


@dataclass(frozen=True)
class FeatureInput:
    """One sparse feature: the model's name for it and the column it reads;
    ``max_len`` > 0: at most the last ``max_len`` ids of a row (0: all)."""

    name: str
    column: str
    hash: bool = False
    bucket: int = 0
    max_len: int = 0


@dataclass
class InputPipeline:
    features: list[FeatureInput]
    label: str | None = "label"
    dense: list[str] = field(default_factory=list)
    dense_transform: str = "none"
    non_finite: str = "error"
    group: str | None = None
    where: str = "input pipeline"  # named in errors (a config file's path)

    def __post_init__(self):
        if self.dense_transform not in TRANSFORMS:
            raise ValueError(f"{self.where}: dense_transform must be one of {TRANSFORMS}, got {self.dense_transform!r}")
        if self.non_finite not in NON_FINITE:
            raise ValueError(f"{self.where}: non_finite must be one of {NON_FINITE}, got {self.non_finite!r}")
        for f in self.features:
            if isinstance(f.max_len, bool) or not isinstance(f.max_len, int) or f.max_len < 0:
                raise ValueError(f"{self.where}: feature {f.name!r}: max_len must be an int >= 0, got {f.max_len!r}")

    def columns(self, label: bool = True) -> list[Column]:
        """The reader's columns: the label (with ``label``), dense, group,
        then the features' (hashed as configured). A column read twice is a
        ValueError."""
        cols, seen = [], set()

        def add(col: Column, what: str):
            if col.name in seen:
                raise ValueError(f"{self.where}: column {col.name!r} is read twice (a feature, label, dense or group)")
            seen.add(col.name)
            cols.append(col)

        if label and self.label:
            add(Column(self.label), "label")
        for name in self.dense + ([self.group] if self.group else []):
            if name not in seen:
                add(Column(name), "dense")
        for f in self.features:
            add(Column(f.column, hash=f.hash, bucket=f.bucket), f"feature {f.name!r}")
        return cols

    def __call__(self, batch: dict) -> dict:
        """A reader batch as model input: each feature's ids (a scalar int
        column becomes one id a row), and the dense columns stacked."""
        out = {}
        for f in self.features:
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
        for f in out["features"]:
            if not f["max_len"]:
                del f["max_len"]  # as pipelines were written before it existed
        return out

    @classmethod
    def from_json(cls, obj: dict, where: str = "input pipeline") -> InputPipeline:
        """The pipeline ``to_json`` wrote; unknown or malformed fields are a
        ValueError naming ``where``."""
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: expected an object, got {type(obj).__name__}")
        known = {"features", "label", "dense", "dense_transform", "non_finite", "group"}
        unknown = sorted(set(obj) - known)
        if unknown:
            raise ValueError(f"{where}: unknown fields {unknown}")
        try:
            features = [FeatureInput(**f) for f in obj["features"]]
            kw = {k: obj[k] for k in known - {"features"} if k in obj}
            if not all(isinstance(c, str) for c in kw.get("dense", [])):
                raise TypeError("dense must be a list of column names")
            return cls(features=features, where=where, **kw)
        except (KeyError, TypeError) as e:
            raise ValueError(f"{where}: malformed ({e})") from None
