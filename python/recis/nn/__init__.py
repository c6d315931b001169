"""Dynamic embedding modules: hash tables, their options, pooled lookups."""

from recis.nn.dynamic_embedding import DynamicEmbedding
from recis.nn.engine import EmbeddingEngine, dense_only
from recis.nn.hash_table import NO_ROW, HashTable
from recis.nn.options import (
    DEFAULT_INITIALIZER,
    AlwaysAdmit,
    ConstantInit,
    CountAdmit,
    EmbeddingOption,
    EvictionOption,
    KaimingNormalInit,
    KaimingUniformInit,
    NormalInit,
    ProbabilityAdmit,
    TruncatedNormalInit,
    UniformInit,
    XavierNormalInit,
    XavierUniformInit,
)

__all__ = [
    "DEFAULT_INITIALIZER",
    "NO_ROW",
    "AlwaysAdmit",
    "ConstantInit",
    "CountAdmit",
    "DynamicEmbedding",
    "EmbeddingEngine",
    "EmbeddingOption",
    "EvictionOption",
    "HashTable",
    "KaimingNormalInit",
    "KaimingUniformInit",
    "NormalInit",
    "ProbabilityAdmit",
    "TruncatedNormalInit",
    "UniformInit",
    "XavierNormalInit",
    "XavierUniformInit",
    "dense_only",
]
