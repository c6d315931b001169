"""Typed configuration of dynamic embedding tables.

``EmbeddingOption`` says everything about one table: its width, how new rows
are initialised, how ids are admitted and evicted, and how a bag of ids is
pooled. Defaults are documented on each field.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field

import torch

# ----------------------------------------------------------------------------
# Initializers: a new row's value is a function of (table seed, id).


@dataclass(frozen=True)
class ConstantInit:
    value: float = 0.0

    def spec(self):
        return "constant", [self.value]


@dataclass(frozen=True)
class UniformInit:
    low: float = -0.05
    high: float = 0.05

    def spec(self):
        return "uniform", [self.low, self.high]


@dataclass(frozen=True)
class NormalInit:
    mean: float = 0.0
    std: float = 0.01

    def spec(self):
        return "normal", [self.mean, self.std]


DEFAULT_INITIALIZER = NormalInit(0.0, 0.01)
"""A new row's value unless an option says otherwise: ``EmbeddingOption``'s
default, the model zoo's (``recis.models``) and a config's (``[[feature]]
init_std``), so that a table built in Python, by a model or from a config
starts alike."""


@dataclass(frozen=True)
class TruncatedNormalInit:
    """Normal(mean, std) restricted to [low, high] (absolute bounds, like
    ``torch.nn.init.trunc_normal_``)."""

    mean: float = 0.0
    std: float = 0.01
    low: float = -0.02
    high: float = 0.02

    def spec(self):
        return "truncated_normal", [self.mean, self.std, self.low, self.high]


@dataclass(frozen=True)
class XavierUniformInit:
    """Glorot uniform with fan_in = fan_out = dim: bound = gain * sqrt(3 / dim)."""

    gain: float = 1.0

    def spec(self):
        return "xavier_uniform", [self.gain]


@dataclass(frozen=True)
class XavierNormalInit:
    """Glorot normal with fan_in = fan_out = dim: std = gain / sqrt(dim)."""

    gain: float = 1.0

    def spec(self):
        return "xavier_normal", [self.gain]


@dataclass(frozen=True)
class KaimingUniformInit:
    """He uniform with fan_in = dim: bound = gain * sqrt(3 / dim)."""

    gain: float = math.sqrt(2.0)

    def spec(self):
        return "kaiming_uniform", [self.gain]


@dataclass(frozen=True)
class KaimingNormalInit:
    """He normal with fan_in = dim: std = gain / sqrt(dim)."""

    gain: float = math.sqrt(2.0)

    def spec(self):
        return "kaiming_normal", [self.gain]


# ----------------------------------------------------------------------------
# Admission: whether a new id gets a row.


@dataclass(frozen=True)
class AlwaysAdmit:
    def spec(self):
        return "always", []


@dataclass(frozen=True)
class CountAdmit:
    """Admit an id once it has been seen ``k`` times (count-min sketch of
    ``width`` x ``depth`` counters; counts halve every ``decay_every`` steps,
    0 = never)."""

    k: int
    width: int = 1 << 18
    depth: int = 4
    decay_every: int = 0

    def spec(self):
        return "min_count", [self.k, self.width, self.depth, self.decay_every]


@dataclass(frozen=True)
class ProbabilityAdmit:
    """Admit each sighting of a new id with probability ``p``."""

    p: float

    def spec(self):
        return "probability", [self.p]


# ----------------------------------------------------------------------------
# Eviction (feature elimination).


@dataclass(frozen=True)
class EvictionOption:
    """Which ids to remove when eviction runs (explicitly via
    ``HashTable.evict`` or every ``every_steps`` steps by a Trainer hook).

    An id is evicted if it meets any set criterion; then, if ``max_rows`` is
    set, the lowest-scored ids (``score``: "lru" or "lfu") go until
    ``max_rows`` remain. ``max_rows`` is per feature table: an
    ``EmbeddingEngine`` table coalescing N features' tables keeps at most
    N × ``max_rows`` rows, ranked together. Under torchrun ``max_rows`` caps
    the whole table: each rank keeps at most ``ceil(max_rows / world)`` of
    the ids it owns.
    """

    ttl_steps: int | None = None
    min_frequency: int | None = None
    max_rows: int | None = None
    score: str = "lru"
    min_l2_norm: float | None = None
    every_steps: int | None = None

    def __post_init__(self):
        if self.score not in ("lru", "lfu"):
            raise ValueError(f"EvictionOption.score must be 'lru' or 'lfu', got {self.score!r}")
        for name in ("ttl_steps", "min_frequency", "max_rows", "every_steps"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 0):
                raise ValueError(f"EvictionOption.{name} must be a non-negative int, got {v!r}")


# ----------------------------------------------------------------------------


@dataclass
class EmbeddingOption:
    """Configuration of one dynamic embedding table.

    Fields:
        dim: embedding width (>= 1).
        dtype: storage type of the rows; float32.
        initializer: value of a new row (default ``DEFAULT_INITIALIZER``,
            Normal(0, 0.01)).
        combiner: pooling of a bag of ids: "sum" or "mean" (with weights,
            "mean" divides by the sum of the weights); "tuple" (in an
            ``EmbeddingEngine``): no pooling, a sequence [B, L, dim].
        admission: when a new id gets a row (default: always).
        eviction: which ids to remove when eviction runs (default: none).
        trainable: whether the optimizer updates this table.
        shared_name: tables with the same shared name are one table.
        seed: seed of the initial values (and of probabilistic admission).
        eval_missing: what an unknown id reads as in eval: "zeros" (as DeepRec
            and the original RecIS) or "initial" (its would-be initial value).
        padding_id: in a dense [B, L] id input, elements equal to this are
            padding and dropped (None: every element is an id).
        initial_capacity: expected number of ids (the table grows beyond it).
        num_shards: id-map shards (a power of two).
    """

    dim: int
    dtype: torch.dtype = torch.float32
    initializer: object = DEFAULT_INITIALIZER
    combiner: str = "sum"
    admission: object = field(default_factory=AlwaysAdmit)
    eviction: EvictionOption | None = None
    trainable: bool = True
    shared_name: str | None = None
    seed: int = 0
    eval_missing: str = "zeros"
    padding_id: int | None = None
    initial_capacity: int = 1 << 14
    num_shards: int = 256

    def __post_init__(self):
        if not isinstance(self.dim, int) or self.dim < 1:
            raise ValueError(f"EmbeddingOption.dim must be a positive int, got {self.dim!r}")
        if self.dtype != torch.float32:
            raise ValueError(f"EmbeddingOption.dtype: only torch.float32 rows are supported, got {self.dtype}")
        if self.combiner not in ("sum", "mean", "tuple"):
            raise ValueError(f"EmbeddingOption.combiner must be 'sum', 'mean' or 'tuple', got {self.combiner!r}")
        if self.eval_missing not in ("zeros", "initial"):
            raise ValueError(f"EmbeddingOption.eval_missing must be 'zeros' or 'initial', got {self.eval_missing!r}")
        if not hasattr(self.initializer, "spec"):
            raise ValueError(f"EmbeddingOption.initializer must be an initializer, got {self.initializer!r}")
        if not hasattr(self.admission, "spec"):
            raise ValueError(f"EmbeddingOption.admission must be an admission policy, got {self.admission!r}")
        if not 0 <= self.seed < 2**64:
            raise ValueError(f"EmbeddingOption.seed must be in [0, 2**64), got {self.seed}")

    def table_config(self) -> dict:
        """The parts that define the table (not how it is pooled), as JSON."""
        return {
            "dim": self.dim,
            "dtype": str(self.dtype),
            "initializer": [type(self.initializer).__name__, asdict(self.initializer)],
            "admission": [type(self.admission).__name__, asdict(self.admission)],
            "eviction": None if self.eviction is None else asdict(self.eviction),
            "seed": self.seed,
        }


# ----------------------------------------------------------------------------
# JSON form of an option (serving exports, checkpoints' model specs): every
# field but the in-memory tuning ones, by class name and fields. No code is
# named that the reader would run: only the classes above are accepted.

_POLICIES = {
    cls.__name__: cls
    for cls in (
        ConstantInit,
        UniformInit,
        NormalInit,
        TruncatedNormalInit,
        XavierUniformInit,
        XavierNormalInit,
        KaimingUniformInit,
        KaimingNormalInit,
        AlwaysAdmit,
        CountAdmit,
        ProbabilityAdmit,
    )
}


def option_to_json(option: EmbeddingOption) -> dict:
    """``option`` as JSON-able values (``option_from_json`` reads it back)."""
    return {
        "dim": option.dim,
        "initializer": [type(option.initializer).__name__, asdict(option.initializer)],
        "combiner": option.combiner,
        "admission": [type(option.admission).__name__, asdict(option.admission)],
        "eviction": None if option.eviction is None else asdict(option.eviction),
        "trainable": option.trainable,
        "shared_name": option.shared_name,
        "seed": option.seed,
        "eval_missing": option.eval_missing,
        "padding_id": option.padding_id,
    }


def option_from_json(obj: dict, where: str = "option") -> EmbeddingOption:
    """The ``EmbeddingOption`` that ``option_to_json`` wrote; anything else
    (an unknown field or policy class, a wrong type) is a ValueError naming
    ``where`` and the field."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected an object, got {type(obj).__name__}")
    known = {"dim", "initializer", "combiner", "admission", "eviction", "trainable", "shared_name", "seed"}
    known |= {"eval_missing", "padding_id"}
    unknown = sorted(set(obj) - known)
    if unknown:
        raise ValueError(f"{where}: unknown fields {unknown}")

    def policy(field_name: str):
        value = obj.get(field_name)
        if value is None:
            return None
        if not (isinstance(value, list) and len(value) == 2 and isinstance(value[1], dict)):
            raise ValueError(f"{where}.{field_name}: expected [class name, fields], got {value!r}")
        cls = _POLICIES.get(value[0])
        if cls is None:
            raise ValueError(f"{where}.{field_name}: unknown class {value[0]!r} (known: {sorted(_POLICIES)})")
        try:
            return cls(**value[1])
        except TypeError as e:
            raise ValueError(f"{where}.{field_name}: {e}") from None

    kwargs = {k: obj[k] for k in ("dim", "combiner", "shared_name", "eval_missing", "padding_id") if k in obj}
    for k in ("initializer", "admission"):
        if obj.get(k) is not None:
            kwargs[k] = policy(k)
    if "trainable" in obj:
        kwargs["trainable"] = bool(obj["trainable"])
    if "seed" in obj:
        kwargs["seed"] = int(obj["seed"])
    try:
        if obj.get("eviction") is not None:
            kwargs["eviction"] = EvictionOption(**obj["eviction"])
        if "dim" not in kwargs:
            raise ValueError("missing field 'dim'")
        return EmbeddingOption(**kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None


def name_seed(seed: int, name: str) -> int:
    """The seed of the table named ``name`` in a model seeded ``seed``: a
    function of the name, never of its position, so that adding, removing or
    reordering features leaves every other table's initial rows as they were
    (BLAKE2b of the UTF-8 name, 64 bits, added to ``seed`` modulo 2**64)."""
    digest = hashlib.blake2b(name.encode(), digest_size=8).digest()
    return (int(seed) + int.from_bytes(digest, "little")) % 2**64
