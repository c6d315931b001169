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
        feats, dense, logit = self.batch_logits(batch_size, rng, vectors)
        return feats, dense, self.labels(logit, rng)

    @staticmethod
    def labels(logit: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
        """Labels [B] (float32 0/1) drawn from sigmoid(``logit``)."""
        labels = (rng.random(len(logit)) < 1.0 / (1.0 + np.exp(-logit))).astype(np.float32)
        return torch.from_numpy(labels)

    def batch_logits(self, batch_size: int, rng: np.random.Generator, vectors: dict | None = None):
        """``batch`` before its labels are drawn: (features, dense, the hidden
        logit [B] float64). ``batch`` is this, then ``labels``: the same
        draws from ``rng``, in the same order."""
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
        return feats, dense, logit


@dataclass
class SyntheticBehaviour:
    """A behaviour sequence per sample and a target item, with a hidden click
    term that depends on how the target relates to the sequence.

    The catalogue holds ``items`` items; item rank ``r`` belongs to the hidden
    category ``r % categories`` and is scrambled to a 63-bit id (salted apart
    from ``SyntheticCTR``'s fields). Each sample (a user) has 1-3 interest
    categories; its history is 0..``max_history`` items (uniform length),
    ordered oldest to newest, each from one of the interests with
    probability ``interest_p``, else from any category; the target item is
    from an interest with probability ``target_interest_p``, else from any
    category. Within a category items are uniform.

    The click term: with ``match_j`` = 1 where history item ``j`` (of ``n``)
    shares the target's category, the recency-weighted match count
    ``s = sum_j match_j * decay ** (n - 1 - j)`` (the newest item weighs 1)
    gives ``strength * (min(s, cap) - offset)``, plus a small fixed weight
    per target item (``item_weight`` times a standard normal of its id). A
    model that sums the history loses which items match the target (and
    which are recent); one that attends over it from the target can see it."""

    items: int = 1000
    categories: int = 20
    max_history: int = 40
    interest_p: float = 0.8
    target_interest_p: float = 0.5
    decay: float = 0.9
    cap: float = 3.0
    strength: float = 1.0
    offset: float = 1.0
    item_weight: float = 0.3
    seed: int = 0

    def __post_init__(self):
        if not 1 <= self.categories <= self.items:
            raise ValueError(f"SyntheticBehaviour: categories must be in 1..items, got {self.categories}")
        if self.max_history < 0:
            raise ValueError(f"SyntheticBehaviour: max_history must be >= 0, got {self.max_history}")
        self._salt = splitmix64(np.array([self.seed * 1000 + 977], dtype=np.uint64))[0]

    def ids_of(self, ranks: np.ndarray) -> np.ndarray:
        """63-bit scrambled ids of zero-based item ranks."""
        return (splitmix64(ranks.astype(np.uint64) ^ self._salt) >> np.uint64(1)).astype(np.int64)

    def _items_of(self, cats: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """A uniform item rank of each category of ``cats``."""
        per = -(-(self.items - cats) // self.categories)  # ranks r < items with r % K == c
        return cats + self.categories * np.floor(rng.random(len(cats)) * per).astype(np.int64)

    def batch(self, batch_size: int, rng: np.random.Generator):
        """(target item ids [B] int64, history RaggedTensor of item ids,
        the click term [B] float64)."""
        k = self.categories
        interests = rng.integers(0, k, size=(batch_size, 3))
        n_interests = rng.integers(1, 4, size=batch_size)
        lengths = rng.integers(0, self.max_history + 1, size=batch_size)
        n = int(lengths.sum())
        owner = np.repeat(np.arange(batch_size), lengths)

        def draw(rows: np.ndarray, p: float) -> np.ndarray:
            pick = np.floor(rng.random(len(rows)) * n_interests[rows]).astype(np.int64)
            cats = np.where(rng.random(len(rows)) < p, interests[rows, pick], rng.integers(0, k, size=len(rows)))
            return self._items_of(cats, rng)

        hist = draw(owner, self.interest_p)
        target = draw(np.arange(batch_size), self.target_interest_p)
        offsets = np.zeros(batch_size + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        # Position from the end: the newest item of a row is 0.
        back = (offsets[1:][owner] - 1) - np.arange(n)
        match = (hist % k == target[owner] % k).astype(np.float64)
        s = np.bincount(owner, weights=match * self.decay**back, minlength=batch_size)
        target_ids, hist_ids = self.ids_of(target), self.ids_of(hist)
        term = self.strength * (np.minimum(s, self.cap) - self.offset)
        term = term + self.item_weight * _unit_normal(splitmix64(target_ids.astype(np.uint64) ^ np.uint64(4242)))
        history = RaggedTensor(torch.from_numpy(hist_ids), torch.from_numpy(offsets), validate=False)
        return torch.from_numpy(target_ids), history, term
