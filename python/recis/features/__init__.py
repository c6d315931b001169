"""Feature engine: raw columns → ids, with one fused native call per op type."""

from recis.features.engine import Feature, FeatureEngine
from recis.features.ops import (
    Bucketize,
    FeatureCross,
    FeatureOpError,
    FillMissing,
    Hash,
    IDMultiHash,
    Lambda,
    Mod,
    Op,
    SelectField,
    SelectFields,
    SequenceTruncate,
)
from recis.features.strings import StringColumn

__all__ = [
    "Bucketize",
    "Feature",
    "FeatureCross",
    "FeatureEngine",
    "FeatureOpError",
    "FillMissing",
    "Hash",
    "IDMultiHash",
    "Lambda",
    "Mod",
    "Op",
    "SelectField",
    "SelectFields",
    "SequenceTruncate",
    "StringColumn",
]
