"""Synthetic CTR data with a known ground truth, for the main job, tests and
benchmarks.

Each of ``num_features`` sparse features draws 1..``max_ids`` ids per sample
from a Zipf(``zipf_s``) law over ``vocab`` ranks; rank ``r`` of feature ``f``
is scrambled to a 63-bit id, as hashed production ids look. The click model
is hidden: every id has a fixed weight (a function of the id), the logit of a
sample is the sum over features of the mean weight of its ids plus a
learnable cross between features 0 and 1, and the label is drawn from
sigmoid(logit). A model can learn it; nothing learns it perfectly.

With ``vector_dim = K``, each sample's item (the first id of feature 0) has
a precomputed content vector: K standard normals, a fixed function of the
item id (as a text or image encoder's output is of the item), and the logit
gains ``vector_strength`` times its projection on a hidden unit direction,
so that the vector carries signal a model can learn for items it has seen
rarely or never.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from recis.ragged import RaggedTensor

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser over a uint64 array (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = (x.astype(np.uint64) + _GOLDEN).astype(np.uint64)
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def _unit_normal(h: np.ndarray) -> np.ndarray:
    """A standard normal value per hash (Box-Muller on two halves)."""
    u1 = ((h >> np.uint64(40)).astype(np.float64) + 1.0) / float(1 << 24)
    u2 = ((h & np.uint64(0xFFFFFF)).astype(np.float64)) / float(1 << 24)
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2 * np.pi * u2)


@dataclass
class SyntheticCTR:
    num_features: int = 8
    vocab: int = 1_000_000
    zipf_s: float = 1.05
    min_ids: int = 1
    max_ids: int = 3
    seed: int = 0
    num_dense: int = 0
    cross_strength: float = 1.0
    vector_dim: int = 0
    vector_strength: float = 1.0

    #: The Zipf table holds 8 bytes per id, with two temporaries as large
    #: while it is built: 2**26 ids is about 1.5 GB.
    MAX_VOCAB = 1 << 26

    def __post_init__(self):
        if not 1 <= self.vocab <= self.MAX_VOCAB:
            raise ValueError(
                f"SyntheticCTR: vocab={self.vocab:,} must be in 1..{self.MAX_VOCAB:,} "
                f"(its Zipf table needs {24 * self.vocab / 2**30:.1f} GiB while it is built)"
            )
        ranks = np.arange(1, self.vocab + 1, dtype=np.float64)
        p = ranks ** (-self.zipf_s)
        self._cdf = np.cumsum(p / p.sum())
        self._salts = splitmix64(np.arange(self.num_features, dtype=np.uint64) + np.uint64(self.seed * 1000 + 17))

    def feature_names(self) -> list[str]:
        return [f"C{i + 1}" for i in range(self.num_features)]

    def ids_of(self, feature: int, ranks: np.ndarray) -> np.ndarray:
        """63-bit scrambled ids of zero-based ranks of a feature."""
        h = splitmix64(ranks.astype(np.uint64) ^ self._salts[feature])
        return (h >> np.uint64(1)).astype(np.int64)

    def item_vectors(self, items: np.ndarray) -> np.ndarray:
        """[N, vector_dim] float32: each item id's content vector."""
        k = np.arange(self.vector_dim, dtype=np.uint64) + np.uint64(7919 + self.seed)
        h = splitmix64(items.astype(np.uint64)[:, None] ^ splitmix64(k)[None, :])
        return _unit_normal(h).astype(np.float32)

    def _direction(self) -> np.ndarray:
        u = _unit_normal(splitmix64(np.arange(self.vector_dim, dtype=np.uint64) + np.uint64(31337 + self.seed)))
        return u / np.linalg.norm(u)

    def id_weight(self, ids: np.ndarray, salt: int) -> np.ndarray:
        return _unit_normal(splitmix64(ids.astype(np.uint64) ^ np.uint64(salt)))

    def batch(self, batch_size: int, rng: np.random.Generator, vectors: dict | None = None):
        """(features: {name: RaggedTensor}, dense [B, num_dense] or None, labels [B]);
        with ``vector_dim``, ``vectors`` (a dict) receives ``"item_vec"``:
        the items' content vectors [B, vector_dim]."""
        feats = {}
        logit = np.full(batch_size, -1.5)
        firsts = []
        for f in range(self.num_features):
            lengths = rng.integers(self.min_ids, self.max_ids + 1, size=batch_size)
            n = int(lengths.sum())
            ranks = np.searchsorted(self._cdf, rng.random(n))
            ranks = np.minimum(ranks, self.vocab - 1)
            ids = self.ids_of(f, ranks)
            offsets = np.zeros(batch_size + 1, dtype=np.int64)
            np.cumsum(lengths, out=offsets[1:])
            w = self.id_weight(ids, 1000 + f) * 0.6
            logit += np.add.reduceat(w, offsets[:-1]) / lengths
            firsts.append(ids[offsets[:-1]])
            feats[self.feature_names()[f]] = RaggedTensor(
                torch.from_numpy(ids), torch.from_numpy(offsets), validate=False
            )
        if self.num_features >= 2 and self.cross_strength:
            cross = splitmix64(firsts[0].astype(np.uint64) * np.uint64(31) ^ firsts[1].astype(np.uint64))
            logit += self.cross_strength * _unit_normal(cross) * 0.5
        if self.vector_dim:
            vec = self.item_vectors(firsts[0])
            logit += self.vector_strength * (vec.astype(np.float64) @ self._direction())
            if vectors is not None:
                vectors["item_vec"] = vec
        dense = None
        if self.num_dense:
            dense_np = rng.standard_normal((batch_size, self.num_dense))
            logit += 0.3 * dense_np[:, 0]
            dense = torch.from_numpy(dense_np.astype(np.float32))
        labels = (rng.random(batch_size) < 1.0 / (1.0 + np.exp(-logit))).astype(np.float32)
        return feats, dense, torch.from_numpy(labels)
